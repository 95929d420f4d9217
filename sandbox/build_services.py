#!/usr/bin/env python3
"""Build the images of the services tests and benchmarks run against, idempotently.

    .venv/bin/python sandbox/build_services.py [--only postgres|s3] [--force] [-v]

Nothing is pulled: both images are built FROM the locally built base image
(``dativo/base:<hash>``, from ``build/images.json``; ``make images`` makes it).
Each is tagged with a hash of its *inputs* and built only when no image has
that tag yet:

* ``dativo/svc-postgres:<hash>``, also tagged ``dativo/svc-postgres:15``:
  PostgreSQL 15 from Debian bookworm, ``sandbox/services/postgres/``. apt runs
  inside the build, so the build has a network: ``DATIVO_BUILD_NETWORK``
  (default ``host``, which does not depend on the engine's default bridge).
* ``dativo/svc-s3:<hash>``, also tagged ``dativo/svc-s3:moto-<version>``: moto's
  server mode (S3 and KMS on one port), ``sandbox/services/s3/``. Its wheels
  are downloaded on the host (``pip download``, pinned in ``requirements.txt``,
  binary wheels for the base's CPython 3.11) and installed offline in a build
  with ``--network none``.

The hash covers a recipe version, the base image ID and every file of the
service's directory (Dockerfile, scripts, requirements); wheel bytes are not
reproducible, so they are not hashed. A new build removes the repository's
older ``<hash>`` images (``--keep-old`` keeps them). ``build/services.json``
records tag, ID, stable tag, version, container port and size of each image.
Standard library only; talks to the engine through the ``docker`` CLI. Each
build's output goes to ``build/logs/svc-<name>.log``, whose tail is printed
when it fails (``-v`` shows it as it happens). Prints one line per image.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

# Shared with the plugin images' build (this directory is on sys.path when run as a script).
from build_images import (
    BuildError,
    docker,
    remove_stale,
    require_engine,
    reset_dir,
    retag,
    short_hash,
)

ROOT = Path(__file__).resolve().parent.parent
SERVICES_DIR = ROOT / "sandbox" / "services"
BUILD = ROOT / "build"
LOGS = BUILD / "logs"
IMAGES_JSON = BUILD / "images.json"
SERVICES_JSON = BUILD / "services.json"
HASH_LENGTH = 16
BASE_REPO = "dativo/base"
STAGE_LABEL = "org.dativo.stage=service-install"

# The base image's interpreter: CPython 3.11, x86_64, glibc 2.36 (bookworm).
# The same target as sandbox/build_images.py (duplicated: that file is not a
# library, and this script must not break while it changes).
WHEEL_TARGET = [
    "--implementation",
    "cp",
    "--python-version",
    "3.11",
    "--abi",
    "cp311",
    *(arg for minor in range(36, 16, -1) for arg in ("--platform", f"manylinux_2_{minor}_x86_64")),
    *("--platform", "manylinux2014_x86_64"),
    *("--platform", "manylinux2010_x86_64"),
    *("--platform", "manylinux1_x86_64"),
]

DOCKER_ENV = {
    **os.environ,
    # The classic builder: works with every client against the Debian 20.10
    # engine, with or without the buildx plugin.
    "DOCKER_BUILDKIT": "0",
    "DOCKER_CLI_HINTS": "false",
}


@dataclass(frozen=True)
class Service:
    name: str
    repo: str
    # Bump to force a rebuild when something outside the hashed files changes
    # the result (e.g. this script's way of building).
    recipe: str
    container_port: int
    # The build's network: apt needs one; an offline install gets `none`.
    build_network: Callable[[], str]
    # Downloads the wheelhouse into the context (or nothing).
    wheels: bool
    # The stable tag next to the hash tag.
    stable_tag: Callable[[], str]
    # Extra --build-arg values.
    build_args: Callable[[], dict[str, str]]

    @property
    def directory(self) -> Path:
        return SERVICES_DIR / self.name


def moto_version() -> str:
    text = (SERVICES_DIR / "s3" / "requirements.txt").read_text(encoding="utf-8")
    found = re.search(r"^moto(?:\[[^\]]*\])?==([^\s;#]+)", text, re.MULTILINE)
    if not found:
        raise BuildError("sandbox/services/s3/requirements.txt pins no moto[server]==VERSION")
    return found.group(1)


def networked_build() -> str:
    return os.environ.get("DATIVO_BUILD_NETWORK", "").strip() or "host"


SERVICES: dict[str, Service] = {
    "postgres": Service(
        name="postgres",
        repo="dativo/svc-postgres",
        recipe="dativo-svc-postgres/1",
        container_port=5432,
        build_network=networked_build,
        wheels=False,
        stable_tag=lambda: "15",
        build_args=dict,
    ),
    "s3": Service(
        name="s3",
        repo="dativo/svc-s3",
        recipe="dativo-svc-s3/1",
        container_port=5000,
        build_network=lambda: "none",
        wheels=True,
        stable_tag=lambda: f"moto-{moto_version()}",
        build_args=lambda: {"MOTO_VERSION": moto_version()},
    ),
}


# -- helpers -----------------------------------------------------------------


def service_files(service: Service) -> list[Path]:
    """Every file of the service's directory, sorted, without caches."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(service.directory):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        found.extend(Path(dirpath, f) for f in filenames if not f.endswith((".pyc", "~")))
    return sorted(found, key=lambda p: p.relative_to(service.directory).as_posix())


def inspect_image(ref: str) -> tuple[str, int] | None:
    """(ID, size in bytes) of an image, None when there is none by that name."""
    proc = docker("image", "inspect", "--format", "{{.Id}} {{.Size}}", ref)
    fields = proc.stdout.split()
    if proc.returncode != 0 or len(fields) != 2:
        return None
    return fields[0], int(fields[1])


@contextlib.contextmanager
def build_lock() -> Iterator[None]:
    """One build_services.py at a time per checkout."""
    BUILD.mkdir(parents=True, exist_ok=True)
    with (BUILD / ".build_services.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("waiting for another build_services.py in this checkout ...", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class Step:
    """Runs the commands of one image, logging to build/logs/svc-<name>.log."""

    def __init__(self, name: str, verbose: bool) -> None:
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log_path = LOGS / f"svc-{name}.log"
        self.verbose = verbose
        self._log: IO[str] = self.log_path.open("w", encoding="utf-8")

    def close(self) -> None:
        self._log.close()

    def run(self, cmd: Sequence[str]) -> None:
        self._log.write(f"$ {' '.join(cmd)}\n")
        self._log.flush()
        out = None if self.verbose else self._log
        proc = subprocess.run(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=DOCKER_ENV
        )
        if proc.returncode != 0:
            self._log.flush()
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
            tail = "\n".join(text.splitlines()[-40:])
            raise BuildError(
                f"command failed with exit status {proc.returncode}: {' '.join(cmd)}\n"
                f"--- last lines of {self.log_path} ---\n{tail}"
            )


def load_json(path: Path) -> dict[str, Any]:
    with contextlib.suppress(ValueError, OSError):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return data
    return {}


# -- base image --------------------------------------------------------------


def find_base(explicit: str | None) -> tuple[str, str]:
    """The base image: --base, else build/images.json, else the newest dativo/base."""
    hint = "run `make images` (sandbox/build_images.py) first"
    if explicit:
        found = inspect_image(explicit)
        if not found:
            raise BuildError(f"the base image {explicit} (--base) does not exist")
        return explicit, found[0]
    recorded = load_json(IMAGES_JSON).get("base") or {}
    tag = recorded.get("tag") if isinstance(recorded, dict) else None
    if isinstance(tag, str):
        found = inspect_image(tag)
        if found:
            return tag, found[0]
    # `docker image ls` lists the newest first.
    proc = docker("image", "ls", BASE_REPO, "--format", "{{.Tag}}")
    tags = [t for t in proc.stdout.split() if t != "<none>"]
    if tags:
        newest = f"{BASE_REPO}:{tags[0]}"
        found = inspect_image(newest)
        if found:
            print(f"note: {IMAGES_JSON} names no existing base image; using {newest}", flush=True)
            return newest, found[0]
    raise BuildError(f"no {BASE_REPO} image exists: {hint}")


# -- service images ----------------------------------------------------------


def service_hash(service: Service, base_id: str) -> str:
    def parts() -> Iterator[tuple[str, bytes]]:
        yield "recipe", service.recipe.encode()
        yield "base-id", base_id.encode()
        yield "stable-tag", service.stable_tag().encode()
        if service.wheels:
            yield "wheel-target", " ".join(WHEEL_TARGET).encode()
        for path in service_files(service):
            yield path.relative_to(service.directory).as_posix(), path.read_bytes()

    return short_hash(parts())


def assemble_context(service: Service, context: Path, step: Step) -> None:
    reset_dir(context)
    for path in service_files(service):
        target = context / path.relative_to(service.directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    if service.wheels:
        wheels = context / "wheels"
        wheels.mkdir()
        step.run(
            [
                sys.executable,
                "-m",
                "pip",
                "--disable-pip-version-check",
                "download",
                "--only-binary=:all:",
                *WHEEL_TARGET,
                "--dest",
                str(wheels),
                "-r",
                str(service.directory / "requirements.txt"),
            ]
        )


def image_version(service: Service, tag: str) -> str:
    """The service's own version, as the image reports it."""
    if service.name == "s3":
        return moto_version()
    proc = docker(
        "run", "--rm", "--pull", "never", "--network", "none",
        "--entrypoint", "postgres", tag, "--version",
    )  # fmt: skip
    # "postgres (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)"
    found = re.search(r"\(PostgreSQL\)\s+(.+)", proc.stdout)
    if proc.returncode != 0 or not found:
        raise BuildError(f"`postgres --version` failed in {tag}: {proc.stderr.strip()}")
    return found.group(1).strip()


def ensure_service(
    service: Service,
    base_tag: str,
    base_id: str,
    recorded: dict[str, Any],
    *,
    force: bool,
    verbose: bool,
    keep_old: bool,
) -> dict[str, Any]:
    digest = service_hash(service, base_id)
    tag = f"{service.repo}:{digest}"
    stable = f"{service.repo}:{service.stable_tag()}"
    existing = inspect_image(tag)
    if existing and not force:
        image, size = existing
        retag(tag, stable, image)
        previous = recorded.get(service.name) or {}
        version = previous.get("version") if previous.get("id") == image else None
        entry = entry_for(service, tag, image, size, stable, version or image_version(service, tag))
        print(f"reused {tag} (as {stable}, {size / 1e6:.0f} MB)", flush=True)
        return entry

    started = time.monotonic()
    context = BUILD / "context" / f"svc-{service.name}"
    step = Step(service.name, verbose)
    try:
        assemble_context(service, context, step)
        cmd = ["docker", "build", "--rm", "--force-rm", "--network", service.build_network()]
        if force:
            cmd.append("--no-cache")
        for key, value in {"BASE_IMAGE": base_tag, **service.build_args()}.items():
            cmd += ["--build-arg", f"{key}={value}"]
        cmd += [
            "--label",
            f"org.dativo.inputs-hash={digest}",
            "--label",
            f"org.dativo.base={base_tag}",
            "--tag",
            tag,
            str(context),
        ]
        step.run(cmd)
        # The install stage's image (apt lists, wheels) is of no further use.
        step.run(["docker", "image", "prune", "--force", "--filter", f"label={STAGE_LABEL}"])
    finally:
        step.close()
        shutil.rmtree(context / "wheels", ignore_errors=True)

    built = inspect_image(tag)
    if not built:
        raise BuildError(f"{tag} is missing right after `docker build`")
    image, size = built
    retag(tag, stable, image)
    if existing and existing[0] != image:
        # --force moved the tags to a new image: drop the old one (unless a container uses it).
        docker("image", "rm", existing[0])
    entry = entry_for(service, tag, image, size, stable, image_version(service, tag))
    elapsed = time.monotonic() - started
    print(f"built {tag} in {elapsed:.1f} s (as {stable}, {size / 1e6:.0f} MB)", flush=True)
    if not keep_old:
        remove_stale(service.repo, keep=digest)
    return entry


def entry_for(
    service: Service, tag: str, image: str, size: int, stable: str, version: str
) -> dict[str, Any]:
    return {
        "tag": tag,
        "id": image,
        "stable_tag": stable,
        "version": version,
        "container_port": service.container_port,
        "size_bytes": size,
    }


def write_services_json(entries: dict[str, dict[str, Any]]) -> None:
    updated = {**load_json(SERVICES_JSON), **entries}
    text = json.dumps(updated, indent=2, sort_keys=True) + "\n"
    if SERVICES_JSON.is_file() and SERVICES_JSON.read_text(encoding="utf-8") == text:
        return
    tmp = SERVICES_JSON.with_suffix(".json.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(SERVICES_JSON)


# -- main --------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build the test-service images (Postgres, S3/KMS); reuse unchanged ones."
    )
    parser.add_argument("--only", choices=sorted(SERVICES), help="handle this image only")
    parser.add_argument(
        "--force", action="store_true", help="rebuild the selected images from scratch (no cache)"
    )
    parser.add_argument(
        "--base", metavar="IMAGE", help="base image (default: the one in build/images.json)"
    )
    parser.add_argument(
        "--keep-old",
        action="store_true",
        help="keep older <hash> images of a repository (by default a new build removes them)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show build output instead of logging it"
    )
    args = parser.parse_args(argv)

    try:
        require_engine()
        with build_lock():
            base_tag, base_id = find_base(args.base)
            recorded = load_json(SERVICES_JSON)
            entries: dict[str, dict[str, Any]] = {}
            for name, service in SERVICES.items():
                if args.only in (None, name):
                    entries[name] = ensure_service(
                        service,
                        base_tag,
                        base_id,
                        recorded,
                        force=args.force,
                        verbose=args.verbose,
                        keep_old=args.keep_old,
                    )
            write_services_json(entries)
    except BuildError as exc:
        print(f"build_services: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
