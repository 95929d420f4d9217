"""Per-run directories: a lock proving the supervisor lives, and one socket directory per plugin.

Layout (the base is private to the supervisor's user, mode 0700)::

    <base>/<run_id>/lock            flock held for the whole run
    <base>/<run_id>/reader/plugin.sock
    <base>/<run_id>/writer/plugin.sock

The supervisor binds each socket *before* the container starts and keeps the listening file
descriptor; it never resolves a socket path again, so whatever a plugin plants in its directory
cannot redirect the supervisor. The socket directories are mounted read-only into the plugins.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import stat
from pathlib import Path

from dativo.errors import EngineError

SOCKET_NAME = "plugin.sock"
_MAX_SUN_PATH = 107


def runtime_base() -> Path:
    """The directory holding run directories, created private to this user if missing."""
    configured = os.environ.get("DATIVO_RUNTIME_DIR")
    if configured:
        base = Path(configured)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        base = Path(os.environ["XDG_RUNTIME_DIR"]) / "dativo"
    else:
        base = Path("/tmp") / f"dativo-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        base.mkdir(mode=0o700, parents=True)
    info = os.lstat(base)
    # Refuse a base someone else could have prepared (a symlink, another owner, open mode).
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise EngineError(
            f"runtime directory `{base}` must be a real directory owned by uid {os.getuid()} "
            "with mode 0700; remove it or set DATIVO_RUNTIME_DIR"
        )
    return base


class RunDirectory:
    """The run's private directory; holds the liveness lock until `close`."""

    def __init__(self, base: Path, run_id: str) -> None:
        self.path = base / run_id
        self.path.mkdir(mode=0o700)
        self._lock_fd = os.open(self.path / "lock", os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._listeners: list[socket.socket] = []

    def listen(self, name: str) -> tuple[Path, socket.socket]:
        """Create `<run>/<name>/` and a listening socket in it; return (directory, listener)."""
        directory = self.path / name
        directory.mkdir(mode=0o755)
        os.chmod(directory, 0o755)  # umask-proof: the plugin user must traverse it
        path = directory / SOCKET_NAME
        if len(str(path)) > _MAX_SUN_PATH:
            raise EngineError(
                f"socket path `{path}` is longer than {_MAX_SUN_PATH} bytes; "
                "set DATIVO_RUNTIME_DIR to a shorter directory"
            )
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        os.chmod(path, 0o666)  # the plugin's non-root user must be able to connect
        listener.listen(1)
        self._listeners.append(listener)
        return directory, listener

    def close(self) -> None:
        """Close listeners, delete the directory, release the lock."""
        for listener in self._listeners:
            listener.close()
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock_fd)


def is_run_alive(run_dir: Path) -> bool:
    """True while some supervisor holds the run's lock."""
    try:
        fd = os.open(run_dir / "lock", os.O_RDWR | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return False
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def stale_run_dirs(base: Path) -> list[Path]:
    """Run directories whose supervisor is gone."""
    stale = []
    for entry in base.iterdir():
        if entry.is_dir() and not entry.is_symlink() and not is_run_alive(entry):
            stale.append(entry)
    return stale
