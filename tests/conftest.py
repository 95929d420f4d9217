"""Session-wide: a private DATIVO_HOME, so tests never read or change the user's trust store."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from dativo.errors import ConfigError
from dativo.signing import HOME_ENV, Policy, dativo_home, load_trust
from dativo.signing._trust import POLICY_HEADER, policy_path


@pytest.fixture(scope="session", autouse=True)
def session_dativo_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A DATIVO_HOME for this session: the built-in images' publisher (`make images` trusts
    the local builder key and signs them) stays trusted, and `allow_unsigned_local` is on, so
    the tests' `type: python` fixture plugins and locally built fixture images can run.
    Signing tests make stricter homes of their own.
    """
    real = dativo_home()
    home = tmp_path_factory.mktemp("dativo-home")
    (home / "trust" / "keys").mkdir(parents=True)
    try:
        trust = load_trust(real)
    except ConfigError:
        trust = None  # no `make images` yet: built-in runs will say so
    policy = Policy(version=1, allow_unsigned_local=True)
    if trust is not None:
        for key in trust.keys.values():
            (home / "trust" / "keys" / f"{key.key_id}.pub.json").write_bytes(key.to_bytes())
        policy = trust.policy.model_copy(update={"allow_unsigned_local": True})
        if (real / "signatures").is_dir():
            shutil.copytree(real / "signatures", home / "signatures", symlinks=False)
    body = yaml.safe_dump(policy.model_dump(mode="json"), sort_keys=False)
    policy_path(home).write_text(POLICY_HEADER + body)
    previous = os.environ.get(HOME_ENV)
    os.environ[HOME_ENV] = str(home)
    yield home
    if previous is None:
        os.environ.pop(HOME_ENV, None)
    else:
        os.environ[HOME_ENV] = previous


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
