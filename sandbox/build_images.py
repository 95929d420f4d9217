#!/usr/bin/env python3
"""Build Dativo's container images, idempotently, with content-addressed tags.

    .venv/bin/python sandbox/build_images.py [--force] [--only base|python|builtin|rust] [-v]

Images, each tagged with a hash of its *inputs* (not of its bytes), and built
only when no image has that tag yet:

* ``dativo/base:<hash>``: a Debian root filesystem bootstrapped by
  ``sandbox/base/build.sh`` (mmdebstrap) and ``docker import``-ed. The hash
  covers the recipe (``sandbox/base/*``), the suite and ``BASE_RECIPE``. The
  rootfs tarball is cached in ``${XDG_CACHE_HOME:-~/.cache}/dativo/`` so that a
  wiped engine re-imports it instead of bootstrapping again.
* ``dativo/plugin-python:<hash>``: ``plugin-images/python/Dockerfile`` on the
  base, installing a wheelhouse (``build/wheelhouse/``: the project's wheel
  and its pinned dependencies) offline. The hash covers the base image ID,
  the Dockerfile, ``requirements.txt``, ``pyproject.toml`` and every file
  under ``src/``; wheel bytes are not reproducible, so they are not hashed.
  It is also tagged ``dativo/plugin-python:<project version>``, the runtime
  image of ``type: python`` plugins (``DATIVO_PYTHON_IMAGE`` overrides it).
* ``dativo/builtin-<name>:<hash>``, one per built-in plugin (``files``,
  ``generate``, ``parquet``, ``null``): ``plugin-images/builtin/Dockerfile`` on
  the plugin image, its class fixed in the entrypoint and its manifest in the
  ``org.dativo.manifest`` label. The hash covers the plugin image ID, the
  Dockerfile and the manifest. Also tagged ``:<project version>``, the tag the
  supervisor runs ``type: builtin`` plugins from.

* ``dativo/rust-postgres:<hash>``: the Rust PostgreSQL reader
  (``plugin-images/rust-postgres/``), compiled on the host with ``cargo build
  --release --locked`` (target directory ``${XDG_CACHE_HOME:-~/.cache}/dativo/
  cargo-target``, shared by every checkout) and copied onto the base image with
  its manifest label. The hash covers the base image ID, ``Cargo.toml``,
  ``Cargo.lock``, ``src/``, the Dockerfile, ``config.schema.json`` and the
  manifest; cargo and docker are skipped when that tag exists. Also tagged
  ``:<crate version>``. ``--only rust`` handles it alone (reusing the base).

Then every built-in image, and dativo/rust-postgres, is **signed** (its image
ID and manifest, Ed25519) with the local builder key
``$DATIVO_HOME/keys/local-builder.key``, generated on the first build (outside
the checkout, so a private key is never committed), whose public key is
trusted in ``$DATIVO_HOME/trust/`` for ``dativo/*``: the policy is created if
absent, and the key added to it idempotently. An image that already has a
valid signature by that key is not signed again.

A new build removes older ``dativo/plugin-python:<hash>`` (and built-in) images
(``--keep-old`` keeps them). ``build/images.json`` records the tags and IDs.
Talks to the engine through the ``docker`` CLI; only the built-in step imports
``dativo`` (from this checkout, in the venv) for the manifests and signing.
Each step's output goes to ``build/logs/<image>.log``, whose tail is printed
when a step fails (``-v`` shows it as it happens).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
BASE_RECIPE_DIR = ROOT / "sandbox" / "base"
PLUGIN_DIR = ROOT / "plugin-images" / "python"
BUILD = ROOT / "build"
WHEELHOUSE = BUILD / "wheelhouse"
CONTEXT = BUILD / "context" / "plugin-python"
PROJECT_COPY = BUILD / "context" / "dativo-src"
LOGS = BUILD / "logs"
IMAGES_JSON = BUILD / "images.json"

# Bump these to force a rebuild when something outside the hashed files
# changes the result (e.g. this script's way of building).
BASE_RECIPE = "dativo-base/1"
PLUGIN_RECIPE = "dativo-plugin-python/1"
BUILTIN_RECIPE = "dativo-builtin/1"
SUITE = "bookworm"
HASH_LENGTH = 16

BASE_REPO = "dativo/base"
PLUGIN_REPO = "dativo/plugin-python"
BUILTIN_REPO = "dativo/builtin-{name}"
BUILTIN_DIR = ROOT / "plugin-images" / "builtin"
BUILDER_KEY = "local-builder"
BUILDER_PUBLISHER = "dativo-local"

# The base image's interpreter: CPython 3.11 on x86_64 with glibc 2.36
# (bookworm). Wheels of any older manylinux policy run there too.
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

# Generated files under src/ that must not change the hash.
IGNORED_DIR_NAMES = {"__pycache__"}
IGNORED_DIR_SUFFIXES = (".egg-info",)
IGNORED_FILE_SUFFIXES = (".pyc", ".pyo")

DOCKER_ENV = {
    **os.environ,
    # The classic builder: works with every client against the Debian 20.10
    # engine, with or without the buildx plugin.
    "DOCKER_BUILDKIT": "0",
    "DOCKER_CLI_HINTS": "false",
}


class BuildError(Exception):
    """A step failed; the message says what to do."""


# -- helpers -----------------------------------------------------------------


def short_hash(parts: Iterator[tuple[str, bytes]]) -> str:
    """A hash of named byte strings, framed so that no two inputs collide."""
    digest = hashlib.sha256()
    for name, data in parts:
        for chunk in (name.encode(), data):
            digest.update(len(chunk).to_bytes(8, "big"))
            digest.update(chunk)
    return digest.hexdigest()[:HASH_LENGTH]


def tree_files(top: Path) -> list[Path]:
    """Every file under top, sorted, without generated files (caches, egg-info)."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in IGNORED_DIR_NAMES and not d.endswith(IGNORED_DIR_SUFFIXES)
        )
        found.extend(Path(dirpath, f) for f in filenames if not f.endswith(IGNORED_FILE_SUFFIXES))
    return sorted(found, key=lambda p: p.relative_to(top).as_posix())


def project_version() -> str:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dativo"


class Step:
    """Runs the commands of one image, logging to build/logs/<name>.log."""

    def __init__(self, name: str, verbose: bool) -> None:
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log_path = LOGS / f"{name}.log"
        self.verbose = verbose
        self._log: IO[str] = self.log_path.open("w", encoding="utf-8")

    def close(self) -> None:
        self._log.close()

    def run(self, cmd: Sequence[str], *, env: dict[str, str] | None = None) -> None:
        self._log.write(f"$ {' '.join(cmd)}\n")
        self._log.flush()
        out = None if self.verbose else self._log
        proc = subprocess.run(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        if proc.returncode != 0:
            self._log.flush()
            tail = self.log_path.read_text(encoding="utf-8", errors="replace")
            tail = "\n".join(tail.splitlines()[-40:])
            raise BuildError(
                f"command failed with exit status {proc.returncode}: {' '.join(cmd)}\n"
                f"--- last lines of {self.log_path} ---\n{tail}"
            )


def docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args],
        capture_output=True,
        text=True,
        env=DOCKER_ENV,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )


def image_id(ref: str) -> str | None:
    proc = docker("image", "inspect", "--format", "{{.Id}}", ref)
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


def require_engine() -> None:
    hint = "Start one with `make engine` (sandbox/engine.sh), then retry."
    if shutil.which("docker") is None:
        raise BuildError(f"the docker CLI is not installed. {hint}")
    try:
        proc = docker("info", "--format", "{{.ServerVersion}}", timeout=30)
    except subprocess.TimeoutExpired:
        raise BuildError(
            f"`docker info` timed out: the Docker engine does not answer. {hint}"
        ) from None
    if proc.returncode != 0 or not proc.stdout.strip():
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise BuildError(
            "the Docker engine does not answer"
            + (f" ({detail[-1]})" if detail else "")
            + f". {hint}"
        )


@contextlib.contextmanager
def build_lock() -> Iterator[None]:
    """One build at a time per checkout."""
    BUILD.mkdir(parents=True, exist_ok=True)
    with (BUILD / ".build_images.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("waiting for another build_images.py in this checkout ...", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def offline_build_command(
    context: Path,
    tag: str,
    *,
    build_args: dict[str, str],
    labels: dict[str, str],
    force: bool,
) -> list[str]:
    """`docker build` of `context` into `tag` with no network (every input is local)."""
    cmd = ["docker", "build", "--rm", "--force-rm", "--network", "none"]
    if force:
        cmd.append("--no-cache")
    for key, value in build_args.items():
        cmd += ["--build-arg", f"{key}={value}"]
    for key, value in labels.items():
        cmd += ["--label", f"{key}={value}"]
    return [*cmd, "--tag", tag, str(context)]


def reset_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# -- base image --------------------------------------------------------------


def base_hash() -> str:
    def parts() -> Iterator[tuple[str, bytes]]:
        yield "recipe", BASE_RECIPE.encode()
        yield "suite", SUITE.encode()
        for name in ("packages.txt", "customize.sh", "build.sh"):
            yield name, (BASE_RECIPE_DIR / name).read_bytes()

    return short_hash(parts())


def ensure_base(*, force: bool, verbose: bool) -> tuple[str, str]:
    digest = base_hash()
    tag = f"{BASE_REPO}:{digest}"
    existing = image_id(tag)
    if existing and not force:
        print(f"reused {tag}", flush=True)
        return tag, existing

    started = time.monotonic()
    tarball = cache_dir() / f"base-{digest}.tar"
    step = Step("base", verbose)
    try:
        bootstrapped = False
        if force or not tarball.is_file():
            tarball.parent.mkdir(parents=True, exist_ok=True)
            partial = tarball.with_name(f"base-{digest}.partial.tar")
            partial.unlink(missing_ok=True)
            step.run(["bash", str(BASE_RECIPE_DIR / "build.sh"), SUITE, str(partial)])
            partial.replace(tarball)
            bootstrapped = True
        changes = [
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            'CMD ["python3"]',
            "LABEL org.dativo.image=base",
            f"LABEL org.dativo.recipe-hash={digest}",
            f"LABEL org.dativo.suite={SUITE}",
            "LABEL org.opencontainers.image.title=dativo-base",
            "LABEL org.opencontainers.image.description="
            '"Debian minbase with python3 and no setuid/setgid files"',
        ]
        cmd = ["docker", "import"]
        for change in changes:
            cmd += ["--change", change]
        cmd += ["--message", f"dativo base {digest} ({SUITE})", str(tarball), tag]
        step.run(cmd, env=DOCKER_ENV)
    finally:
        step.close()

    new_id = image_id(tag)
    if not new_id:
        raise BuildError(f"{tag} is missing right after `docker import`")
    elapsed = time.monotonic() - started
    how = "built" if bootstrapped else f"imported (from {tarball})"
    print(f"{how} {tag} in {elapsed:.1f} s", flush=True)
    return tag, new_id


# -- plugin image ------------------------------------------------------------


def plugin_hash(base_id: str) -> str:
    def parts() -> Iterator[tuple[str, bytes]]:
        yield "recipe", PLUGIN_RECIPE.encode()
        yield "wheel-target", " ".join(WHEEL_TARGET).encode()
        yield "base-id", base_id.encode()
        yield "Dockerfile", (PLUGIN_DIR / "Dockerfile").read_bytes()
        yield "requirements.txt", (PLUGIN_DIR / "requirements.txt").read_bytes()
        yield "pyproject.toml", (ROOT / "pyproject.toml").read_bytes()
        for path in tree_files(ROOT / "src"):
            yield path.relative_to(ROOT).as_posix(), path.read_bytes()

    return short_hash(parts())


def copy_project(dest: Path) -> None:
    """The files a wheel is built from, without caches or stale egg-info."""
    reset_dir(dest)
    for name in ("pyproject.toml", "README.md", "LICENSE", "LICENSE.txt", "NOTICE"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, dest / name)
    for path in tree_files(ROOT / "src"):
        target = dest / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


def build_wheelhouse(step: Step) -> None:
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    reset_dir(WHEELHOUSE)
    # The project itself: built from a clean copy so no build/ or egg-info
    # lands in the checkout, and the wheel holds exactly the hashed files.
    copy_project(PROJECT_COPY)
    step.run([*pip, "wheel", "--no-deps", "--wheel-dir", str(WHEELHOUSE), str(PROJECT_COPY)])
    # Its dependencies: binary wheels for the image's interpreter, whatever
    # the interpreter running this script.
    step.run(
        [
            *pip,
            "download",
            "--only-binary=:all:",
            *WHEEL_TARGET,
            "--dest",
            str(WHEELHOUSE),
            "-r",
            str(PLUGIN_DIR / "requirements.txt"),
        ]
    )
    wheels = sorted(p.name for p in WHEELHOUSE.glob("*.whl"))
    step.run(["echo", "wheelhouse:", *wheels])
    if not any(name.startswith("dativo-") for name in wheels):
        raise BuildError(f"no dativo wheel in {WHEELHOUSE}; see {step.log_path}")


def assemble_context() -> None:
    reset_dir(CONTEXT)
    shutil.copy2(PLUGIN_DIR / "Dockerfile", CONTEXT / "Dockerfile")
    shutil.copy2(PLUGIN_DIR / "requirements.txt", CONTEXT / "requirements.txt")
    (CONTEXT / "wheels").mkdir()
    for wheel in WHEELHOUSE.glob("*.whl"):
        link_or_copy(wheel, CONTEXT / "wheels" / wheel.name)


def ensure_plugin(
    base_tag: str, base_id: str, *, force: bool, verbose: bool, keep_old: bool
) -> tuple[str, str, str]:
    digest = plugin_hash(base_id)
    version = project_version()
    tag = f"{PLUGIN_REPO}:{digest}"
    version_tag = f"{PLUGIN_REPO}:{version}"
    existing = image_id(tag)
    if existing and not force:
        retag(tag, version_tag, existing)
        print(f"reused {tag} (as {version_tag})", flush=True)
        return tag, existing, version_tag

    started = time.monotonic()
    step = Step("plugin-python", verbose)
    try:
        build_wheelhouse(step)
        assemble_context()
        # --network none: the install must work offline, as at an air-gapped site.
        cmd = offline_build_command(
            CONTEXT,
            tag,
            build_args={"BASE_IMAGE": base_tag, "DATIVO_VERSION": version},
            labels={"org.dativo.inputs-hash": digest, "org.dativo.base": base_tag},
            force=force,
        )
        step.run(cmd, env=DOCKER_ENV)
        # The install stage's image (it holds the wheels) is of no further use.
        step.run(
            ["docker", "image", "prune", "--force", "--filter", "label=org.dativo.stage=install"],
            env=DOCKER_ENV,
        )
    finally:
        step.close()

    new_id = image_id(tag)
    if not new_id:
        raise BuildError(f"{tag} is missing right after `docker build`")
    retag(tag, version_tag, new_id)
    elapsed = time.monotonic() - started
    print(f"built {tag} in {elapsed:.1f} s (as {version_tag})", flush=True)
    if not keep_old:
        remove_stale(PLUGIN_REPO, keep=digest)
    return tag, new_id, version_tag


def remove_stale(repo: str, *, keep: str) -> None:
    """Untag (and so delete) the repo's other hash-tagged images.

    Every change under src/ makes a new plugin image; without this they pile
    up at a few hundred MB each. Images in use by a container stay.
    """
    proc = docker("image", "ls", repo, "--format", "{{.Tag}}")
    stale = [
        f"{repo}:{t}"
        for t in proc.stdout.split()
        if t != keep and len(t) == HASH_LENGTH and all(c in "0123456789abcdef" for c in t)
    ]
    if stale:
        docker("image", "rm", *stale)


def retag(tag: str, alias: str, wanted_id: str) -> None:
    if image_id(alias) == wanted_id:
        return
    proc = docker("tag", tag, alias)
    if proc.returncode != 0:
        raise BuildError(f"docker tag {tag} {alias} failed: {proc.stderr.strip()}")


# -- built-in plugin images, signed ------------------------------------------


def signing_module() -> Any:
    """dativo.signing from this checkout (the venv has its dependencies)."""
    src = str(ROOT / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    import dativo.signing

    return dativo.signing


def builtin_hash(plugin_id: str, name: str, implementation: str, label: str) -> str:
    def parts() -> Iterator[tuple[str, bytes]]:
        yield "recipe", BUILTIN_RECIPE.encode()
        yield "plugin-id", plugin_id.encode()
        yield "Dockerfile", (BUILTIN_DIR / "Dockerfile").read_bytes()
        yield "name", name.encode()
        yield "implementation", implementation.encode()
        yield "manifest", label.encode()

    return short_hash(parts())


def ensure_builtin(
    name: str, plugin_tag: str, plugin_id: str, *, force: bool, verbose: bool, keep_old: bool
) -> tuple[str, str, str]:
    signing = signing_module()
    from dativo.connectors import BUILTINS

    version = project_version()
    implementation = BUILTINS[name][1]
    label = signing.builtin_manifest_label(name, version)
    digest = builtin_hash(plugin_id, name, implementation, label)
    repo = BUILTIN_REPO.format(name=name)
    tag, version_tag = f"{repo}:{digest}", f"{repo}:{version}"
    existing = image_id(tag)
    if existing and not force:
        retag(tag, version_tag, existing)
        print(f"reused {tag} (as {version_tag})", flush=True)
        return tag, existing, version_tag

    started = time.monotonic()
    context = BUILD / "context" / f"builtin-{name}"
    reset_dir(context)
    template = (BUILTIN_DIR / "Dockerfile").read_text(encoding="utf-8")
    # json.dumps gives the exec-form string literal, quotes and all.
    dockerfile = template.replace('"@IMPLEMENTATION@"', json.dumps(implementation))
    (context / "Dockerfile").write_text(dockerfile, encoding="utf-8")
    step = Step(f"builtin-{name}", verbose)
    try:
        cmd = offline_build_command(
            context,
            tag,
            build_args={"PLUGIN_IMAGE": plugin_tag},
            labels={
                "org.dativo.inputs-hash": digest,
                "org.dativo.plugin": name,
                signing.LABEL_MANIFEST: label,
            },
            force=force,
        )
        step.run(cmd, env=DOCKER_ENV)
    finally:
        step.close()
    new_id = image_id(tag)
    if not new_id:
        raise BuildError(f"{tag} is missing right after `docker build`")
    retag(tag, version_tag, new_id)
    print(f"built {tag} in {time.monotonic() - started:.1f} s (as {version_tag})", flush=True)
    if not keep_old:
        remove_stale(repo, keep=digest)
    return tag, new_id, version_tag


def builder_key() -> Any:
    """The local builder key, generated on first use and trusted for `dativo/*`."""
    signing = signing_module()
    keys = signing.dativo_home() / "keys"
    key_path = keys / f"{BUILDER_KEY}.key"
    if not key_path.exists():
        _, _, public = signing.generate_key(BUILDER_KEY, keys, publisher=BUILDER_PUBLISHER)
        print(
            f"generated the local builder key {key_path} (id {public.key_id}); it stays in "
            "$DATIVO_HOME, outside the checkout, and is never committed",
            flush=True,
        )
    key = signing.load_private_key(key_path)
    for change in signing.add_trusted_key(
        key.public, publisher=BUILDER_PUBLISHER, plugins=["dativo/*"]
    ):
        print(f"trust: {change}", flush=True)
    return key


def sign_builtin(key: Any, image: str) -> None:
    """Sign `image` with `key` unless it already has a valid signature by that key."""
    signing = signing_module()
    proc = docker("image", "inspect", image)
    if proc.returncode != 0:
        raise BuildError(f"cannot inspect {image}: {proc.stderr.strip()}")
    data = json.loads(proc.stdout)[0]
    config = data.get("Config") or {}
    facts = signing.ImageFacts(
        id=data["Id"],
        labels=config.get("Labels") or {},
        entrypoint=tuple(config["Entrypoint"]) if config.get("Entrypoint") else None,
        cmd=tuple(config["Cmd"]) if config.get("Cmd") else None,
        repo_digests=tuple(data.get("RepoDigests") or ()),
    )
    directory = signing.signatures_dir(signing.dativo_home(), facts.id)
    target = directory / f"{key.key_id}.sig.json"
    if target.exists():
        raw, manifest = signing.image_manifest(facts)
        found = signing.read_signature_files(directory)
        mine = [s for s in found if isinstance(s, signing.SignatureFile) and s.key_id == key.key_id]
        accepted, _ = signing.check_signatures(facts, raw, manifest, mine, signing.load_trust())
        if accepted is not None:
            return
    signature, manifest = signing.sign_image(facts, key)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{key.key_id}.sig.json.tmp"
    tmp.write_bytes(signature.to_bytes())
    tmp.replace(target)
    print(f"signed {image} ({manifest.name} {manifest.version}) with key {key.key_id}", flush=True)


def ensure_builtins(
    plugin_tag: str, plugin_id: str, *, force: bool, verbose: bool, keep_old: bool
) -> dict[str, dict[str, str]]:
    from dativo.errors import DativoError

    entries: dict[str, dict[str, str]] = {}
    try:
        key = builder_key()
        from dativo.connectors import BUILTINS

        for name in BUILTINS:
            tag, new_id, version_tag = ensure_builtin(
                name, plugin_tag, plugin_id, force=force, verbose=verbose, keep_old=keep_old
            )
            sign_builtin(key, version_tag)
            entries[f"builtin-{name}"] = {"tag": tag, "id": new_id, "version_tag": version_tag}
    except DativoError as exc:
        raise BuildError(f"signing the built-in images failed: {exc}") from None
    return entries


# -- the Rust PostgreSQL reader, signed ----------------------------------------

RUST_POSTGRES_DIR = ROOT / "plugin-images" / "rust-postgres"
RUST_POSTGRES_REPO = "dativo/rust-postgres"
RUST_POSTGRES_RECIPE = "dativo-rust-postgres/1"
RUST_POSTGRES_BINARY = "dativo-rust-postgres"
RUST_POSTGRES_ENTRYPOINT = ["/usr/local/bin/dativo-rust-postgres"]
# Like the built-ins (src/dativo/signing/_builtin.py): the job file's defaults and bounds.
RUST_POSTGRES_RESOURCES = {
    "default": {"cpus": 1.0, "memory": "1GiB", "pids": 128, "timeout": "1h"},
    "max": {"cpus": 64.0, "memory": "64GiB", "pids": 4096, "timeout": "7d"},
}


def rust_postgres_manifest() -> dict[str, Any]:
    """The manifest of dativo/rust-postgres: version from Cargo.toml, config schema from
    config.schema.json, validated as the supervisor will."""
    signing = signing_module()
    with (RUST_POSTGRES_DIR / "Cargo.toml").open("rb") as f:
        version = str(tomllib.load(f)["package"]["version"])
    schema = json.loads((RUST_POSTGRES_DIR / "config.schema.json").read_text(encoding="utf-8"))
    manifest = {
        "manifest_version": 1,
        "name": RUST_POSTGRES_REPO,
        "version": version,
        "kind": "reader",
        "protocol": 1,
        "entrypoint": RUST_POSTGRES_ENTRYPOINT,
        "description": (
            "Reads a PostgreSQL table or query with binary COPY, decoded into Arrow in Rust "
            "(docs/postgres.md). The job's network grant names the database."
        ),
        # A generic connector: the job's grant decides which database it reaches.
        "network": ["*:*"],
        "resources": RUST_POSTGRES_RESOURCES,
        "config_schema": schema,
        "secrets": ["password"],
    }
    signing.parse_manifest(manifest)
    return manifest


def rust_postgres_hash(base_id: str, label: str) -> str:
    """The crate's inputs (not target/), the Dockerfile, the base image and the manifest."""

    def parts() -> Iterator[tuple[str, bytes]]:
        yield "recipe", RUST_POSTGRES_RECIPE.encode()
        yield "base-id", base_id.encode()
        for name in ("Cargo.toml", "Cargo.lock", "Dockerfile", "config.schema.json"):
            yield name, (RUST_POSTGRES_DIR / name).read_bytes()
        for path in tree_files(RUST_POSTGRES_DIR / "src"):
            yield path.relative_to(ROOT).as_posix(), path.read_bytes()
        yield "manifest", label.encode()

    return short_hash(parts())


def find_cargo() -> str:
    found = shutil.which("cargo") or str(Path.home() / ".cargo" / "bin" / "cargo")
    if not Path(found).is_file():
        raise BuildError(
            "cargo is not installed, and dativo/rust-postgres is compiled on this host: install "
            "Rust with rustup (the `rustup` package, then `rustup default stable`), make sure "
            "`cargo` is on PATH (~/.cargo/bin), then retry"
        )
    return found


def build_rust_postgres_binary(step: Step) -> Path:
    """`cargo build --release --locked`, into a target directory shared by every checkout."""
    target = cache_dir() / "cargo-target"
    cargo = find_cargo()
    # rustup's proxies (cargo, rustc) find each other on PATH, which may lack ~/.cargo/bin.
    path = os.pathsep.join([str(Path(cargo).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "CARGO_TARGET_DIR": str(target), "PATH": path}
    manifest_path = str(RUST_POSTGRES_DIR / "Cargo.toml")
    step.run([cargo, "build", "--release", "--locked", "--manifest-path", manifest_path], env=env)
    binary = target / "release" / RUST_POSTGRES_BINARY
    if not binary.is_file():
        raise BuildError(f"cargo finished but {binary} is missing; see {step.log_path}")
    return binary


def ensure_rust_postgres(
    base_tag: str, base_id: str, *, force: bool, verbose: bool, keep_old: bool
) -> dict[str, str]:
    """dativo/rust-postgres:<hash>, built only when its inputs changed, retagged with its
    version and signed with the local builder key like the built-ins."""
    signing = signing_module()
    from dativo.errors import DativoError

    manifest = rust_postgres_manifest()
    label = signing.canonical_json(manifest).decode()
    digest = rust_postgres_hash(base_id, label)
    tag = f"{RUST_POSTGRES_REPO}:{digest}"
    version_tag = f"{RUST_POSTGRES_REPO}:{manifest['version']}"
    existing = image_id(tag)
    if existing and not force:
        print(f"reused {tag} (as {version_tag})", flush=True)
    else:
        started = time.monotonic()
        step = Step("rust-postgres", verbose)
        try:
            binary = build_rust_postgres_binary(step)
            compiled = time.monotonic() - started
            context = BUILD / "context" / "rust-postgres"
            reset_dir(context)
            shutil.copy2(RUST_POSTGRES_DIR / "Dockerfile", context / "Dockerfile")
            shutil.copy2(binary, context / RUST_POSTGRES_BINARY)
            cmd = offline_build_command(
                context,
                tag,
                build_args={"BASE_IMAGE": base_tag},
                labels={
                    "org.dativo.inputs-hash": digest,
                    "org.dativo.base": base_tag,
                    signing.LABEL_MANIFEST: label,
                },
                force=force,
            )
            step.run(cmd, env=DOCKER_ENV)
        finally:
            step.close()
        existing = image_id(tag)
        if not existing:
            raise BuildError(f"{tag} is missing right after `docker build`")
        elapsed = time.monotonic() - started
        print(f"built {tag} in {elapsed:.1f} s (cargo {compiled:.1f} s)", flush=True)
        if not keep_old:
            remove_stale(RUST_POSTGRES_REPO, keep=digest)
    retag(tag, version_tag, existing)
    try:
        sign_builtin(builder_key(), version_tag)
    except DativoError as exc:
        raise BuildError(f"signing {version_tag} failed: {exc}") from None
    return {"tag": tag, "id": existing, "version_tag": version_tag}


# -- main --------------------------------------------------------------------


def write_images_json(entries: dict[str, dict[str, str]]) -> None:
    current: dict[str, dict[str, str]] = {}
    if IMAGES_JSON.is_file():
        with contextlib.suppress(ValueError, OSError):
            current = json.loads(IMAGES_JSON.read_text(encoding="utf-8"))
    updated = {**current, **entries}
    text = json.dumps(updated, indent=2, sort_keys=True) + "\n"
    if IMAGES_JSON.is_file() and IMAGES_JSON.read_text(encoding="utf-8") == text:
        return
    tmp = IMAGES_JSON.with_suffix(".json.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(IMAGES_JSON)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build Dativo's images; reuse those whose inputs did not change."
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="rebuild the selected images from scratch (the base re-bootstraps)",
    )
    parser.add_argument(
        "--only",
        choices=["base", "python", "builtin", "rust"],
        help="handle these images only (each still reuses, or builds, the images it needs)",
    )
    parser.add_argument(
        "--keep-old",
        action="store_true",
        help="keep older dativo/plugin-python:<hash> images (by default a new build removes them)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show build output instead of logging it"
    )
    args = parser.parse_args(argv)

    try:
        require_engine()
        with build_lock():
            entries: dict[str, dict[str, str]] = {}
            base_tag, base_id = ensure_base(
                force=args.force and args.only not in ("python", "rust"), verbose=args.verbose
            )
            entries["base"] = {"tag": base_tag, "id": base_id}
            if args.only not in ("base", "rust"):
                tag, image, version_tag = ensure_plugin(
                    base_tag,
                    base_id,
                    force=args.force and args.only != "builtin",
                    verbose=args.verbose,
                    keep_old=args.keep_old,
                )
                entries["plugin-python"] = {"tag": tag, "id": image, "version_tag": version_tag}
            if args.only in (None, "builtin"):
                entries.update(
                    ensure_builtins(
                        tag,
                        image,
                        force=args.force,
                        verbose=args.verbose,
                        keep_old=args.keep_old,
                    )
                )
            if args.only in (None, "rust"):
                entries["rust-postgres"] = ensure_rust_postgres(
                    base_tag,
                    base_id,
                    force=args.force,
                    verbose=args.verbose,
                    keep_old=args.keep_old,
                )
            write_images_json(entries)
    except BuildError as exc:
        print(f"build_images: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
