"""The key broker's wire protocol: JSON lines on a Unix socket, one request, one answer.

The supervisor serves it to an encrypting writer (`dativo.supervisor._keybroker`); the writer
calls `wrap_key` whenever pyarrow asks it to wrap a fresh data key. There is one operation::

    -> {"op": "wrap", "key_id": "pii", "key": "<base64 of 16, 24 or 32 bytes>"}
    <- {"ok": true, "wrapped": "dativo-wk1...."}
    <- {"ok": false, "error": "..."}

There is deliberately no `unwrap`: a writer can seal data keys but never open one, so a
hostile writer cannot use the broker to decrypt anything. Lines are at most `MAX_LINE` bytes.
"""

from __future__ import annotations

import base64
import json
import socket
from typing import Any

__all__ = [
    "BROKER_SOCKET",
    "MAX_LINE",
    "BrokerError",
    "decode_request",
    "encode_answer",
    "wrap_key",
]

#: The broker's socket name inside the writer's socket directory.
BROKER_SOCKET = "keys.sock"
#: Longest request or answer line, newline included.
MAX_LINE = 16384
_KEY_LENGTHS = (16, 24, 32)
_TIMEOUT = 60.0


class BrokerError(Exception):
    """The broker refused a request, or could not be reached; the message says why."""


def decode_request(line: bytes) -> tuple[str, bytes]:
    """(key_id, key) of a well-formed `wrap` request.

    Raises:
        BrokerError: anything else, with a message fit to send back.
    """
    if len(line) > MAX_LINE:
        raise BrokerError(f"request longer than {MAX_LINE} bytes")
    try:
        request = json.loads(line)
    except ValueError:
        raise BrokerError("request is not JSON") from None
    if not isinstance(request, dict):
        raise BrokerError("request is not a JSON object")
    op = request.get("op")
    if op != "wrap":
        raise BrokerError(f"unsupported operation `{str(op)[:32]}`: the broker only wraps keys")
    if set(request) != {"op", "key_id", "key"}:
        raise BrokerError("a `wrap` request has exactly `op`, `key_id` and `key`")
    key_id, key = request["key_id"], request["key"]
    if not isinstance(key_id, str) or not isinstance(key, str):
        raise BrokerError("`key_id` and `key` must be strings")
    try:
        raw = base64.b64decode(key, validate=True)
    except ValueError:
        raise BrokerError("`key` is not base64") from None
    if len(raw) not in _KEY_LENGTHS:
        raise BrokerError("`key` must be 16, 24 or 32 bytes")
    return key_id, raw


def encode_answer(*, wrapped: str | None = None, error: str | None = None) -> bytes:
    """One answer line."""
    answer: dict[str, Any] = (
        {"ok": True, "wrapped": wrapped} if error is None else {"ok": False, "error": error}
    )
    return json.dumps(answer, separators=(",", ":")).encode() + b"\n"


def _recv_line(sock: socket.socket) -> bytes:
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_LINE:
            raise BrokerError("the broker's answer is too long")
    return bytes(data)


def wrap_key(socket_path: str, key_id: str, key: bytes, *, timeout: float = _TIMEOUT) -> str:
    """Ask the broker at `socket_path` to wrap `key` under master key `key_id`.

    Raises:
        BrokerError: the broker refused (its message says why) or cannot be reached.
    """
    request = {"op": "wrap", "key_id": key_id, "key": base64.b64encode(key).decode()}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(socket_path)
            sock.sendall(json.dumps(request).encode() + b"\n")
            line = _recv_line(sock)
    except OSError as exc:
        raise BrokerError(
            f"cannot reach the supervisor's key broker ({exc.strerror or exc})"
        ) from None
    try:
        answer = json.loads(line)
    except ValueError:
        raise BrokerError("the key broker closed the connection without an answer") from None
    if not isinstance(answer, dict):
        raise BrokerError("the key broker's answer is malformed")
    if answer.get("ok") is True and isinstance(answer.get("wrapped"), str):
        return str(answer["wrapped"])
    raise BrokerError(str(answer.get("error") or "the key broker refused")[:1000])
