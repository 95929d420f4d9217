"""Byte forwarding between two connected stream sockets, one direction per call.

Shared by the supervisor's network forwarder (granted destination <-> plugin's Unix socket) and
the plugin host's loopback relay inside a container. Linux moves the bytes with `splice(2)`
through a pipe of bounded size, so they are never copied into Python; elsewhere, or if the
kernel refuses a splice, a `recv_into`/`sendall` loop with one bounded buffer does the same.
Either way a direction holds at most `CHUNK` bytes in flight: when the receiver stops reading,
the sender's socket fills up and the sender blocks (backpressure).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Callable

__all__ = ["CHUNK", "forward"]

CHUNK = 256 << 10
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Python 3.10+ names it; not on every platform)
_SPLICE = hasattr(os, "splice")
_FALLBACK_ERRNOS = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM}


def forward(
    src: socket.socket,
    dst: socket.socket,
    *,
    on_bytes: Callable[[int], None] | None = None,
) -> int:
    """Copy `src` to `dst` until `src` ends, then half-close `dst` (SHUT_WR).

    Both sockets must be blocking. Returns the bytes forwarded. `on_bytes(n)` is called after
    each chunk is fully written. A reset or broken connection ends the copy quietly and shuts
    both sockets down, so the copy in the other direction ends too; the byte count is then what
    got through.
    """
    total = 0
    try:
        if _SPLICE:
            try:
                total = _splice_loop(src, dst, on_bytes)
            except _NoSplice as exc:
                total = exc.done + _copy_loop(src, dst, on_bytes)
        else:
            total = _copy_loop(src, dst, on_bytes)
    except (_Ended, OSError) as exc:
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return exc.done if isinstance(exc, _Ended) else total
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)
    return total


class _NoSplice(Exception):
    def __init__(self, done: int) -> None:
        self.done = done


class _Ended(Exception):
    def __init__(self, done: int) -> None:
        self.done = done


def _splice_loop(
    src: socket.socket, dst: socket.socket, on_bytes: Callable[[int], None] | None
) -> int:
    read_end, write_end = os.pipe()
    try:
        with contextlib.suppress(OSError):
            import fcntl

            fcntl.fcntl(write_end, _F_SETPIPE_SZ, CHUNK)
        src_fd, dst_fd = src.fileno(), dst.fileno()
        total = 0
        while True:
            try:
                n = os.splice(src_fd, write_end, CHUNK)
            except OSError as exc:
                if exc.errno in _FALLBACK_ERRNOS and total == 0:
                    raise _NoSplice(0) from None
                raise _Ended(total) from None
            if n == 0:
                return total
            pending = n
            while pending:
                try:
                    pending -= os.splice(read_end, dst_fd, pending)
                except OSError:
                    # The bytes in the pipe never reached `dst`: it is gone.
                    raise _Ended(total + n - pending) from None
            total += n
            if on_bytes is not None:
                on_bytes(n)
    finally:
        os.close(read_end)
        os.close(write_end)


def _copy_loop(
    src: socket.socket, dst: socket.socket, on_bytes: Callable[[int], None] | None
) -> int:
    buffer = memoryview(bytearray(CHUNK))
    total = 0
    while True:
        try:
            n = src.recv_into(buffer)
        except OSError:
            raise _Ended(total) from None
        if n == 0:
            return total
        try:
            dst.sendall(buffer[:n])
        except OSError:
            raise _Ended(total) from None
        total += n
        if on_bytes is not None:
            on_bytes(n)
