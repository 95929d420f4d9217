"""Protocol v1: frames, typed control messages, and a socket channel with deadlines.

A frame is an 8-byte header followed by its payload::

    byte 0      kind: 1 = CONTROL (a UTF-8 JSON object), 2 = ARROW (one Arrow IPC message)
    bytes 1-3   reserved, must be zero
    bytes 4-7   payload length, unsigned 32-bit little-endian

`docs/protocol.md` is the normative description; this module is its reference implementation.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from dativo.errors import ProtocolError

__all__ = [
    "HEADER",
    "KIND_ARROW",
    "KIND_CONTROL",
    "MAX_CONTROL_BYTES",
    "PROTOCOL_VERSION",
    "Abort",
    "Bye",
    "Channel",
    "Checkpoint",
    "ControlMessage",
    "End",
    "Error",
    "Hello",
    "Init",
    "Log",
    "PeerClosed",
    "Ready",
    "Result",
    "Shutdown",
    "decode_control",
    "encode_control",
]

PROTOCOL_VERSION = 1
HEADER = struct.Struct("<B3xI")
KIND_CONTROL = 1
KIND_ARROW = 2
MAX_CONTROL_BYTES = 1 << 20
#: A reusable receive buffer starts at this size and at most doubles as a frame's bytes arrive.
#: Deepest nesting of arrays and objects in a control message (the message itself is level 1).
MAX_JSON_DEPTH = 64


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Hello(_Message):
    """Plugin -> supervisor, first frame: who the plugin is and which versions it speaks."""

    type: Literal["hello"] = "hello"
    protocols: list[int] = Field(min_length=1, max_length=16)
    role: Literal["reader", "writer"]
    plugin: str = Field(max_length=200)
    version: str = Field(max_length=100)


class Init(_Message):
    """Supervisor -> plugin: the chosen version, the config, and (readers) the saved state."""

    type: Literal["init"] = "init"
    protocol: int
    run_id: str
    config: dict[str, Any]
    state: dict[str, Any] | None = None
    batch_size: int = 65536
    max_frame_bytes: int


class Ready(_Message):
    """Writer -> supervisor: initialized, send the schema and batches."""

    type: Literal["ready"] = "ready"


class Checkpoint(_Message):
    """Reader -> supervisor: `state` is valid once every batch sent before it is written."""

    type: Literal["checkpoint"] = "checkpoint"
    state: dict[str, Any]


class Log(_Message):
    """Plugin -> supervisor: one log record (rate-limited and truncated by the supervisor)."""

    type: Literal["log"] = "log"
    level: Literal["debug", "info", "warning", "error"] = "info"
    message: str


class Error(_Message):
    """Either direction: the sender failed; the run is over."""

    type: Literal["error"] = "error"
    category: Literal["config", "source", "plugin", "protocol", "internal"] = "plugin"
    message: str
    transient: bool = False
    detail: str | None = None


class End(_Message):
    """Reader -> supervisor after the last batch (with the final state); supervisor -> writer
    after the last batch (no state)."""

    type: Literal["end"] = "end"
    state: dict[str, Any] | None = None


class Result(_Message):
    """Writer -> supervisor: what `finalize` returned (files staged, metadata)."""

    type: Literal["result"] = "result"
    files: list[dict[str, Any]] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)


class Abort(_Message):
    """Supervisor -> plugin: the run failed; discard partial output and exit."""

    type: Literal["abort"] = "abort"
    reason: str


class Shutdown(_Message):
    """Supervisor -> plugin: the run is complete; close and exit."""

    type: Literal["shutdown"] = "shutdown"


class Bye(_Message):
    """Plugin -> supervisor: closed cleanly; the last frame before the plugin exits."""

    type: Literal["bye"] = "bye"


ControlMessage = Annotated[
    Hello | Init | Ready | Checkpoint | Log | Error | End | Result | Abort | Shutdown | Bye,
    Field(discriminator="type"),
]
_CONTROL = TypeAdapter(ControlMessage)


def encode_control(message: _Message) -> bytes:
    """Serialize a control message as a complete frame."""
    payload = message.model_dump_json(exclude_none=True).encode()
    if len(payload) > MAX_CONTROL_BYTES:
        raise ProtocolError(f"control message of {len(payload)} bytes exceeds 1 MiB")
    return HEADER.pack(KIND_CONTROL, len(payload)) + payload


def decode_control(payload: bytes | memoryview) -> ControlMessage:
    """Parse and validate one control payload.

    Raises:
        ProtocolError: not UTF-8 JSON, or not a valid v1 control message.
    """
    try:
        data = json.loads(bytes(payload))
    except RecursionError:
        raise ProtocolError("control frame nests JSON arrays or objects too deeply") from None
    except ValueError as exc:
        # Also a number of more than 4,300 digits, which `int()` refuses (CVE-2020-10735).
        raise ProtocolError(f"control frame is not UTF-8 JSON ({str(exc)[:200]})") from None
    if _too_deep(data, MAX_JSON_DEPTH):
        # Deeper values could not be sent back (a saved state goes into the next `init`).
        raise ProtocolError(f"control message nests more than {MAX_JSON_DEPTH} levels deep")
    try:
        return _CONTROL.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        kind = data.get("type") if isinstance(data, dict) else None
        # The peer chose `type` and the keys: quote them short and escaped.
        problem = _quote(first["msg"], 300)
        raise ProtocolError(
            f"invalid control message (type `{_quote(kind)}`): `{_quote(where)}`: {problem}"
        ) from None


def _too_deep(value: object, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def _quote(value: object, limit: int = 80) -> str:
    text = repr(value)[1:-1] if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class PeerClosed(ProtocolError):
    """The peer closed the socket (or it was reset) at a frame boundary or inside a frame."""


class Channel:
    """One connected plugin socket, framed, with a deadline on every blocking operation.

    `check` is called about every `poll` seconds while blocked; it raises to cancel (a run
    deadline passed, the other plugin failed, the user pressed Ctrl-C).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_frame_bytes: int,
        poll: float = 0.25,
        check: Callable[[], None] | None = None,
    ) -> None:
        self.sock = sock
        self.max_frame_bytes = max_frame_bytes
        self._check = check or (lambda: None)
        self._poll = poll
        self._header = bytearray(HEADER.size)
        self._slots: dict[int, mmap.mmap] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self._send_lock = threading.Lock()
        sock.settimeout(poll)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for buffer in self._slots.values():
            with contextlib.suppress(BufferError):  # a view still lives; the GC frees it later
                buffer.close()
        self._slots.clear()

    def _recv_into(
        self, view: memoryview, deadline: float | None, done: int = 0, total: int | None = None
    ) -> None:
        """Fill `view`; `done` of `total` bytes of the frame part came before it (messages)."""
        got = 0
        need = len(view)
        total = need if total is None else total
        while got < need:
            try:
                n = self.sock.recv_into(view[got:], need - got)
            except TimeoutError:
                self._tick(deadline)
                continue
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise PeerClosed(f"connection reset after {done + got} of {total} bytes") from exc
            if n == 0:
                raise PeerClosed(
                    "connection closed"
                    if done + got == 0
                    else f"connection closed inside a frame after {done + got} of {total} bytes"
                )
            got += n

    def _tick(self, deadline: float | None) -> None:
        self._check()
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError

    def recv_frame(
        self, *, deadline: float | None = None, reuse: bool = False, slot: int = 0
    ) -> tuple[int, memoryview]:
        """Read one frame; return its kind and payload.

        With `reuse`, the payload lives in reusable buffer number `slot`, which the next call
        with the same slot overwrites (the relay forwards the bytes before reusing a slot);
        otherwise it is fresh memory.

        Raises:
            ProtocolError: bad header, oversized frame. PeerClosed: EOF.
            TimeoutError: `deadline` (monotonic seconds) passed.
        """
        header = memoryview(self._header)
        self._recv_into(header, deadline)
        kind, length = HEADER.unpack(self._header)
        if self._header[1:4] != b"\0\0\0":
            raise ProtocolError("frame header reserved bytes are not zero")
        if kind == KIND_CONTROL:
            if length > MAX_CONTROL_BYTES:
                raise ProtocolError(f"control frame of {length} bytes exceeds the 1 MiB limit")
        elif kind == KIND_ARROW:
            if length > self.max_frame_bytes:
                raise ProtocolError(
                    f"Arrow frame of {length} bytes exceeds the limit of "
                    f"{self.max_frame_bytes} bytes (`run.max_frame_bytes`)"
                )
        else:
            raise ProtocolError(f"unknown frame kind {kind}")
        if reuse:
            view = self._slot(slot)[:length]
        elif kind == KIND_ARROW:
            # Uninitialised Arrow memory: no zero-filling of a buffer about to be overwritten.
            view = memoryview(pa.allocate_buffer(length))
        else:
            view = memoryview(bytearray(length))
        self._recv_into(view, deadline)
        self.bytes_in += HEADER.size + length
        return kind, view

    def _slot(self, slot: int) -> memoryview:
        """A reusable receive buffer as large as the largest frame allowed.

        It is anonymous memory reserved, not committed: the kernel backs a page only when bytes
        land in it, so a frame that declares 2 GiB and sends 1 KB costs one page, and the
        resident size is that of the largest frame actually received.
        """
        buffer = self._slots.get(slot)
        if buffer is None:
            size = max(self.max_frame_bytes, MAX_CONTROL_BYTES)
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
            buffer = self._slots[slot] = mmap.mmap(-1, size, flags=flags)
        return memoryview(buffer)

    def recv_control(self, *, deadline: float | None = None) -> ControlMessage:
        """Read one frame that must be a control message."""
        kind, payload = self.recv_frame(deadline=deadline)
        if kind != KIND_CONTROL:
            raise ProtocolError("expected a control frame, got an Arrow frame")
        return decode_control(payload)

    def send(self, message: _Message, *, deadline: float | None = None) -> None:
        """Send one control message."""
        self.send_buffers([encode_control(message)], deadline=deadline)

    def send_arrow(self, payload: Any, *, deadline: float | None = None) -> None:
        """Send one Arrow IPC message (any object with the buffer protocol) as a frame."""
        view = memoryview(payload).cast("B")
        self.send_buffers([HEADER.pack(KIND_ARROW, len(view)), view], deadline=deadline)

    @contextlib.contextmanager
    def arrow_frame(
        self, length: int, *, deadline: float | None = None
    ) -> Iterator[Callable[[Any], None]]:
        """Send one Arrow frame of `length` bytes whose payload is written piece by piece.

        The header goes first and the channel stays locked until the payload is complete, so
        no other message can interleave; a payload of any other length is a bug, and raises.
        """
        with self._send_lock:
            self._send_views([memoryview(HEADER.pack(KIND_ARROW, length))], deadline)
            sent = 0

            def write(data: Any) -> None:
                nonlocal sent
                view = memoryview(data).cast("B")
                sent += len(view)
                if sent > length:
                    raise ProtocolError(f"Arrow frame payload exceeds its declared {length} bytes")
                if len(view):
                    self._send_views([view], deadline)

            yield write
            if sent != length:
                raise ProtocolError(f"Arrow frame payload of {sent} bytes, {length} declared")

    def send_buffers(self, buffers: Sequence[Any], *, deadline: float | None = None) -> None:
        """Send the buffers in order, as one write where the kernel allows."""
        views = [memoryview(b).cast("B") for b in buffers]
        views = [v for v in views if len(v)]
        with self._send_lock:
            self._send_views(views, deadline)

    def _send_views(self, views: list[memoryview], deadline: float | None) -> None:
        while views:
            try:
                sent = self.sock.sendmsg(views)
            except TimeoutError:
                self._tick(deadline)
                continue
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise PeerClosed("connection closed while sending") from exc
            self.bytes_out += sent
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if views and sent:
                views[0] = views[0][sent:]
