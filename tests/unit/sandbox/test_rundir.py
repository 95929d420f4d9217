"""Run directories: private base, liveness lock, sockets bound before any container starts."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dativo.errors import EngineError
from dativo.sandbox._rundir import RunDirectory, is_run_alive, runtime_base, stale_run_dirs


def test_base_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATIVO_RUNTIME_DIR", str(tmp_path / "rt"))
    base = runtime_base()
    assert stat.S_IMODE(os.lstat(base).st_mode) == 0o700


@pytest.mark.parametrize("kind", ["open-mode", "symlink"])
def test_suspicious_base_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    path = tmp_path / "rt"
    if kind == "open-mode":
        path.mkdir(mode=0o777)
        os.chmod(path, 0o777)
    else:
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        path.symlink_to(tmp_path / "elsewhere")
    monkeypatch.setenv("DATIVO_RUNTIME_DIR", str(path))
    with pytest.raises(EngineError, match="mode 0700"):
        runtime_base()


def test_lock_tells_live_from_dead(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path, "r1")
    assert is_run_alive(run.path)
    assert stale_run_dirs(tmp_path) == []
    (tmp_path / "dead").mkdir()
    assert stale_run_dirs(tmp_path) == [tmp_path / "dead"]
    run.close()
    assert not run.path.exists()
    assert not is_run_alive(run.path)


def test_listening_socket_is_bound_before_start(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path, "r2")
    try:
        directory, listener = run.listen("reader")
        sock_path = directory / "plugin.sock"
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
        assert stat.S_IMODE(os.lstat(directory).st_mode) == 0o755
        # Replacing the path afterwards does not affect the supervisor's listener.
        sock_path.unlink()
        sock_path.symlink_to("/etc/passwd")
        assert listener.fileno() >= 0
    finally:
        run.close()


def test_overlong_socket_path_refused(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 90)
    deep.mkdir()
    run = RunDirectory(deep, "r3")
    try:
        with pytest.raises(EngineError, match="longer than"):
            run.listen("reader")
    finally:
        run.close()
