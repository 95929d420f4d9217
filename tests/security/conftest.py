"""Fixtures of the hostile-plugin suite: the engine, the fixture images, a private trust store,
runtime and work directories, and the session-wide checks (peak memory, nothing left behind).
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from dativo.sandbox import LABEL_RUN_DIR
from dativo.supervisor._plugins import python_image
from tests.security import _images
from tests.security._attack import own_containers

MANAGED = {"label": "org.dativo.managed=true"}
_SESSION: dict[str, Any] = {}


def peak_rss_mib() -> float:
    """This process's peak resident memory since the suite began (the supervisor runs in it).

    The kernel's high-water mark (VmHWM) is reset when the suite starts, so tests that ran
    before it in the same pytest session do not count; without /proc, the process's peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> None:
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS


@pytest.fixture(scope="package")
def client(docker_engine: str) -> Any:
    return docker.from_env()


@pytest.fixture(scope="package", autouse=True)
def session_dir() -> Iterator[Path]:
    """The suite's private directory (runtime base, trust store, work directories), for the
    whole of tests/security (package scope: the environment is restored after its last test).

    At the end: no container or network of the suite's runs is left, the runtime base is empty,
    and no /tmp entry of this session (its directory, a default runtime base) is left.
    """
    tmp_before = set(os.listdir("/tmp"))
    default_base = f"dativo-{os.getuid()}"
    base = Path(tempfile.mkdtemp(prefix="dativo-security-", dir="/tmp"))
    runtime = base / "run"
    runtime.mkdir(mode=0o700)
    saved = {key: os.environ.get(key) for key in ("DATIVO_RUNTIME_DIR", "DATIVO_HOME")}
    os.environ["DATIVO_RUNTIME_DIR"] = str(runtime)
    _reset_peak_rss()
    _SESSION["rss_start"] = peak_rss_mib()
    try:
        yield base
    finally:
        _SESSION["rss_peak"] = peak_rss_mib()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        leftovers = _leftovers(runtime)
        shutil.rmtree(base, ignore_errors=True)
        new_tmp = sorted(set(os.listdir("/tmp")) - tmp_before)
        _SESSION["tmp_new"] = new_tmp
        # Ours would be the session directory or the default runtime base; other `dativo*`
        # entries belong to other supervisors or test sessions sharing this machine.
        ours = [n for n in new_tmp if n.startswith("dativo-security-") or n == default_base]
        assert not leftovers, f"left behind by the security suite: {leftovers}"
        assert not ours, f"/tmp entries left behind by the security suite: {ours}"


def _leftovers(runtime: Path) -> list[str]:
    found: list[str] = []
    try:
        found += [f"container {name}" for name in own_containers(runtime)]
        prefix = str(runtime) + "/"
        for network in docker.from_env().api.networks(filters=MANAGED):
            if (network.get("Labels") or {}).get(LABEL_RUN_DIR, "").startswith(prefix):
                found.append(f"network {network.get('Name')}")
    except docker.errors.DockerException:
        pass  # no engine: the tests themselves failed or were skipped
    if runtime.is_dir():
        found += [f"run directory {p}" for p in runtime.iterdir()]
    return found


@pytest.fixture(scope="package")
def fixture_images(docker_engine: str, session_dir: Path) -> dict[str, str]:
    """Every hostile fixture image, built once (content-addressed), and trusted: name -> tag."""
    tags = _images.build_all(python_image(), session_dir)
    _trust_fixtures(session_dir / "home", tags)
    return tags


def _trust_fixtures(home: Path, tags: dict[str, str]) -> None:
    """A private DATIVO_HOME in which the fixture images are signed by a trusted test key.

    It starts as a copy of this machine's trust store and signatures (so the built-in images,
    which run the writers, verify as they would in any run), then a session key is trusted to
    sign `dativo-test/*` and signs every fixture. Runs are thus verified like any signed
    plugin's; nothing relies on `allow_unsigned_local`.
    """
    from dativo.sandbox import Engine
    from dativo.signing import (
        add_trusted_key,
        dativo_home,
        generate_key,
        load_private_key,
        sign_image,
        signatures_dir,
    )

    source = dativo_home()
    home.mkdir(parents=True, exist_ok=True)
    for part in ("trust", "signatures"):
        if (source / part).is_dir():
            shutil.copytree(source / part, home / part, symlinks=True, dirs_exist_ok=True)
    keys = home / "test-keys"
    keys.mkdir(mode=0o700, exist_ok=True)
    key_path, _, public = generate_key("dativo-test", keys, publisher="dativo-test")
    add_trusted_key(public, publisher="dativo-test", plugins=["dativo-test/*"], home=home)
    key = load_private_key(key_path)
    engine = Engine()
    for tag in tags.values():
        info = engine.image(tag)
        signature, _ = sign_image(info, key)
        directory = signatures_dir(home, info.id)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{key.key_id}.sig.json").write_bytes(signature.to_bytes())
    os.environ["DATIVO_HOME"] = str(home)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if "rss_peak" not in _SESSION:
        return
    terminalreporter.write_sep("-", "dativo security suite")
    peak, start = _SESSION["rss_peak"], _SESSION["rss_start"]
    terminalreporter.write_line(
        f"supervisor (this pytest process) peak RSS during the suite: {peak:.0f} MiB "
        f"(at its start: {start:.0f} MiB)"
    )
    if _SESSION.get("tmp_new"):
        terminalreporter.write_line(
            f"new /tmp entries during the session (not Dativo's): {_SESSION['tmp_new']}"
        )


@pytest.fixture
def workdir(session_dir: Path) -> Iterator[Path]:
    """A fresh directory for one test's job, target and state; removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="test-", dir=session_dir))
    yield path
    shutil.rmtree(path, ignore_errors=True)
