"""Build the hostile fixture plugin images of tests/fixtures/images, each only once.

Every directory there with a Dockerfile is one image, built like any plugin: `FROM` the Python
plugin runtime image (by ID), its `*.py` files and `_lib/hostile.py` copied in, the manifest in
its `org.dativo.manifest` label. The tag is `dativo-test/<name>:<hash>`, the hash covering the
runtime image ID, the recipe and every input file, so an unchanged fixture is never rebuilt and
a changed one always is. Older tags of the same fixture are removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "images"
LIB = FIXTURES / "_lib"
REPOSITORY = "dativo-test"
# Bump to rebuild every fixture when the way they are built changes.
RECIPE = "dativo-test-fixtures/1"
_ENV = {**os.environ, "DOCKER_BUILDKIT": "0", "DOCKER_CLI_HINTS": "false"}


class FixtureBuildError(Exception):
    """`docker build` of a fixture failed; the message carries its output."""


def names() -> list[str]:
    return sorted(p.parent.name for p in FIXTURES.glob("*/Dockerfile"))


def _inputs(name: str) -> list[Path]:
    return sorted((FIXTURES / name).iterdir()) + sorted(LIB.glob("*.py"))


def inputs_hash(name: str, base_id: str) -> str:
    digest = hashlib.sha256()
    for part in (RECIPE.encode(), base_id.encode()):
        digest.update(len(part).to_bytes(8, "big") + part)
    for path in _inputs(name):
        if path.is_file():
            for part in (path.name.encode(), path.read_bytes()):
                digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()[:16]


def _docker(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False, env=_ENV
    )


def image_id(reference: str) -> str | None:
    proc = _docker("image", "inspect", "--format", "{{.Id}}", reference)
    return proc.stdout.strip() if proc.returncode == 0 else None


def build_all(base_image: str, workdir: Path) -> dict[str, str]:
    """Build (or find) every fixture image on `base_image`; return name -> tag."""
    base_id = image_id(base_image)
    if base_id is None:
        raise FixtureBuildError(f"the plugin runtime image `{base_image}` is missing: make images")
    tags: dict[str, str] = {}
    for name in names():
        tag = f"{REPOSITORY}/{name}:{inputs_hash(name, base_id)}"
        tags[name] = tag
        if image_id(tag) is None:
            _build(name, tag, base_id, workdir)
        _remove_stale(name, tag)
    return tags


def _build(name: str, tag: str, base_id: str, workdir: Path) -> None:
    context = workdir / f"context-{name}"
    context.mkdir(parents=True)
    try:
        for path in _inputs(name):
            if path.is_file():
                shutil.copy2(path, context / path.name)
        proc = _docker(
            "build",
            "--quiet",
            "--network",
            "none",
            "--build-arg",
            f"BASE_IMAGE={base_id}",
            "--tag",
            tag,
            str(context),
        )
    finally:
        shutil.rmtree(context, ignore_errors=True)
    if proc.returncode != 0:
        raise FixtureBuildError(f"building {tag} failed:\n{(proc.stderr or proc.stdout)[-3000:]}")


def _remove_stale(name: str, keep: str) -> None:
    listing = _docker(
        "image", "ls", "--filter", f"reference={REPOSITORY}/{name}", "--format", "{{json .}}"
    )
    for line in listing.stdout.splitlines():
        entry = json.loads(line)
        reference = f"{entry['Repository']}:{entry['Tag']}"
        if reference != keep and entry["Tag"] != "<none>":
            _docker("image", "rm", reference)  # still in use elsewhere: it stays, harmless
