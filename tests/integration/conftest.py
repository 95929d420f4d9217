"""Fixtures for tests that need a Docker engine."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def in_ci() -> bool:
    """True under CI (CI=true), where a missing engine is a failure, never a skip."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


@pytest.fixture(scope="session")
def docker_engine() -> str:
    """The Docker engine's server version, checked once per session with `docker info`.

    When no engine answers, the test fails under CI=true and is skipped otherwise.
    """
    problem: str
    if shutil.which("docker") is None:
        problem = "the docker CLI is not installed"
    else:
        try:
            proc = subprocess.run(
                ["docker", "info", "--format", "{{.ServerVersion}}"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except subprocess.TimeoutExpired:
            problem = "`docker info` timed out after 30 s"
        else:
            version = proc.stdout.strip()
            if proc.returncode == 0 and version:
                return version
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            problem = "`docker info` failed" + (f": {lines[-1]}" if lines else "")
    message = f"no Docker engine answers ({problem}); run `make engine`"
    if in_ci():
        pytest.fail(
            f"{message} [CI=true: a missing engine fails, it is never skipped]", pytrace=False
        )
    pytest.skip(message)


@pytest.fixture(scope="session", autouse=True)
def private_runtime_dir() -> Iterator[Path]:
    """Give this test session its own run-directory base.

    Containers carry their run directory as a label, so tests can tell their own containers
    from those of other supervisors sharing the engine (a developer's benchmark, say).
    """
    base = Path(tempfile.mkdtemp(prefix="dativo-t-", dir="/tmp"))
    previous = os.environ.get("DATIVO_RUNTIME_DIR")
    os.environ["DATIVO_RUNTIME_DIR"] = str(base)
    yield base
    if previous is None:
        del os.environ["DATIVO_RUNTIME_DIR"]
    else:
        os.environ["DATIVO_RUNTIME_DIR"] = previous
    shutil.rmtree(base, ignore_errors=True)
