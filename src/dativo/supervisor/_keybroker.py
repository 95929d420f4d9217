"""The key broker: wraps the data keys of an encrypting writer, and nothing else.

Bound in the writer's socket directory before the writer starts (`keys.sock`, the directory is
mounted read-only at `/run/dativo`), it answers `wrap` requests of `dativo.protocol.keys` with
the job's key service, only for the job's own master key ids. It never unwraps: a hostile
writer can seal keys but open none. One thread, one connection at a time, bounded lines and a
per-connection deadline; closed at the end of the run. Each wrap is logged (key id and
version, never key bytes) for the audit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Collection
from pathlib import Path
from typing import Any

from dativo.keys import KeyService, KeyServiceError, parse_wrapped
from dativo.protocol.keys import BROKER_SOCKET, MAX_LINE, BrokerError, decode_request, encode_answer

__all__ = ["KeyBroker"]

log = logging.getLogger(__name__)

_CONNECTION_DEADLINE = 10.0
# Far above any real run (a wrap per column per file), low enough that a writer looping on
# the broker cannot run up an unbounded KMS bill.
MAX_WRAPS = 100_000


class KeyBroker:
    """Serves `wrap` for one run; see the module docstring."""

    def __init__(self, service: KeyService, key_ids: Collection[str], socket_dir: Path) -> None:
        self.service = service
        self.key_ids = frozenset(key_ids)
        self.path = socket_dir / BROKER_SOCKET
        self.failure: KeyServiceError | None = None
        self.wraps: dict[tuple[str, str], int] = {}  # (key id, version) -> data keys wrapped
        self.refused = 0
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.path))
        os.chmod(self.path, 0o666)  # the plugin's non-root user must be able to connect
        self._listener.listen(8)
        self._listener.settimeout(0.2)
        self._thread = threading.Thread(target=self._serve, name="dativo-keybroker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(_CONNECTION_DEADLINE + 1)
        self._listener.close()

    def report(self) -> dict[str, Any]:
        """Wrap counts per key version, for the run report."""
        return {
            "service": self.service.describe(),
            "wrapped": [
                {"key_id": k, "version": v, "data_keys": n}
                for (k, v), n in sorted(self.wraps.items())
            ],
            "refused": self.refused,
        }

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                try:
                    self._answer(conn)
                except Exception:  # a broken peer must not stop the broker
                    log.debug("key broker: connection failed", exc_info=True)

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(_CONNECTION_DEADLINE)
        data = bytearray()
        while b"\n" not in data and len(data) <= MAX_LINE:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        line = bytes(data).split(b"\n", 1)[0]
        try:
            if len(data) > MAX_LINE:
                raise BrokerError(f"request longer than {MAX_LINE} bytes")
            key_id, key = decode_request(line)
            if key_id not in self.key_ids:
                raise BrokerError(f"key `{key_id[:100]}` is not one of this job's master keys")
            if sum(self.wraps.values()) >= MAX_WRAPS:
                raise BrokerError(f"more than {MAX_WRAPS:,} data keys asked for in one run")
        except BrokerError as exc:
            self.refused += 1
            log.warning("key broker: refused a request from the writer: %s", exc)
            with contextlib.suppress(OSError):
                conn.sendall(encode_answer(error=str(exc)))
            return
        try:
            wrapped = self.service.wrap(key_id, key)
        except KeyServiceError as exc:
            if self.failure is None:
                self.failure = exc
            conn.sendall(encode_answer(error=str(exc)))
            return
        finally:
            del key
        version = parse_wrapped(wrapped, service=self.service.name).version
        self.wraps[(key_id, version)] = self.wraps.get((key_id, version), 0) + 1
        log.info("key broker: wrapped a data key under `%s` version %s", key_id, version)
        conn.sendall(encode_answer(wrapped=wrapped))
