"""Bounds-checked inspection of one encapsulated Arrow IPC message, before pyarrow sees it.

pyarrow trusts the lengths inside IPC metadata. A hostile plugin controls those bytes, so the
supervisor reads the few fields it needs straight from the flatbuffer, checks every offset
against the frame it already holds, and refuses anything protocol v1 does not allow
(dictionaries, body compression, tensors) before handing the bytes to pyarrow.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

CONTINUATION = 0xFFFFFFFF
PREFIX = struct.Struct("<Ii")

# Message.header union tags (format/Message.fbs).
HEADER_SCHEMA = 1
HEADER_DICTIONARY_BATCH = 2
HEADER_RECORD_BATCH = 3
_HEADER_NAMES = {
    0: "NONE",
    1: "Schema",
    2: "DictionaryBatch",
    3: "RecordBatch",
    4: "Tensor",
    5: "SparseTensor",
}
METADATA_V4 = 3
METADATA_V5 = 4

#: Most fields a schema may declare, counting nested ones. pyarrow holds several hundred bytes
#: per field (a 56 MB record batch frame of one million columns costs it about 500 MB), so the
#: frame limit alone would let a plugin make the supervisor allocate ten times what it sends.
MAX_FIELDS = 10_000
#: Deepest nesting of types a schema may declare (list<list<...>>, struct<struct<...>>).
MAX_NESTING = 64

_U8 = struct.Struct("<B")
_I16 = struct.Struct("<h")
_U16 = struct.Struct("<H")
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_BUFFER = struct.Struct("<qq")  # Buffer {offset: long, length: long}


class IpcFormatError(ValueError):
    """The bytes are not an acceptable protocol-v1 Arrow IPC message."""


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """What the supervisor needs to know about one IPC message."""

    header_type: int
    metadata_length: int
    body_length: int
    rows: int  # RecordBatch.length; 0 for a schema
    nodes: int = 0  # RecordBatch.nodes: one per field, nested fields included
    fields: int = 0  # Schema: fields declared, nested fields included

    @property
    def header_name(self) -> str:
        return _HEADER_NAMES.get(self.header_type, f"unknown({self.header_type})")


class _Table:
    """A flatbuffer table view that refuses every out-of-bounds read."""

    __slots__ = ("_buf", "_end", "_pos", "_vt", "_vt_len")

    def __init__(self, buf: memoryview, pos: int, end: int) -> None:
        self._buf = buf
        self._end = end
        _check(pos, 4, end, "table")
        self._pos = pos
        vt = pos - _I32.unpack_from(buf, pos)[0]
        _check(vt, 4, end, "vtable")
        vt_len = _U16.unpack_from(buf, vt)[0]
        if vt_len < 4 or vt_len % 2:
            raise IpcFormatError(f"flatbuffer vtable size {vt_len} is invalid")
        _check(vt, vt_len, end, "vtable")
        self._vt = vt
        self._vt_len = vt_len

    def _field(self, index: int) -> int:
        slot = 4 + 2 * index
        if slot + 2 > self._vt_len:
            return 0
        off: int = _U16.unpack_from(self._buf, self._vt + slot)[0]
        return off

    def scalar(self, index: int, fmt: struct.Struct, default: int = 0) -> int:
        off = self._field(index)
        if off == 0:
            return default
        _check(self._pos + off, fmt.size, self._end, "field")
        value: int = fmt.unpack_from(self._buf, self._pos + off)[0]
        return value

    def has(self, index: int) -> bool:
        return self._field(index) != 0

    def table(self, index: int) -> _Table | None:
        off = self._field(index)
        if off == 0:
            return None
        at = self._pos + off
        _check(at, 4, self._end, "offset")
        return _Table(self._buf, at + _U32.unpack_from(self._buf, at)[0], self._end)

    def vector_len(self, index: int) -> int:
        return self.vector(index, 0)[1]

    def vector(self, index: int, item_size: int) -> tuple[int, int]:
        """(position of the first item, item count); every item lies inside the metadata."""
        off = self._field(index)
        if off == 0:
            return 0, 0
        at = self._pos + off
        _check(at, 4, self._end, "offset")
        vec = at + _U32.unpack_from(self._buf, at)[0]
        _check(vec, 4, self._end, "vector")
        n: int = _U32.unpack_from(self._buf, vec)[0]
        _check(vec + 4, n * item_size, self._end, "vector")
        return vec + 4, n

    def tables(self, index: int) -> list[_Table]:
        """The tables of a vector of tables."""
        start, n = self.vector(index, 4)
        return [
            _Table(
                self._buf, start + 4 * i + _U32.unpack_from(self._buf, start + 4 * i)[0], self._end
            )
            for i in range(n)
        ]


def _check(pos: int, size: int, end: int, what: str) -> None:
    if pos < 0 or pos + size > end:
        raise IpcFormatError(f"flatbuffer {what} at offset {pos} lies outside the metadata")


def inspect_message(frame: memoryview, *, max_rows: int) -> MessageInfo:
    """Check one encapsulated IPC message that must fill `frame` exactly; return its facts.

    Raises:
        IpcFormatError: the framing, metadata or body length is inconsistent, or the message
            uses a feature protocol v1 forbids.
    """
    size = len(frame)
    if size < PREFIX.size:
        raise IpcFormatError(f"Arrow frame of {size} bytes is shorter than an IPC prefix")
    marker, meta_len = PREFIX.unpack_from(frame, 0)
    if marker != CONTINUATION:
        raise IpcFormatError("Arrow IPC message does not start with the 0xFFFFFFFF marker")
    if meta_len <= 0:
        raise IpcFormatError("end-of-stream marker inside an Arrow frame; send `end` instead")
    if meta_len % 8:
        raise IpcFormatError(f"IPC metadata length {meta_len} is not a multiple of 8")
    meta_end = PREFIX.size + meta_len
    if meta_end > size:
        raise IpcFormatError(
            f"IPC metadata declares {meta_len} bytes but the frame holds {size - PREFIX.size}"
        )
    meta = frame[PREFIX.size : meta_end]
    _check(0, 4, meta_len, "root offset")
    message = _Table(meta, _U32.unpack_from(meta, 0)[0], meta_len)

    version = message.scalar(0, _I16)
    if version not in (METADATA_V4, METADATA_V5):
        raise IpcFormatError(f"IPC metadata version {version} is not supported (need V4 or V5)")
    header_type = message.scalar(1, _U8)
    body_length = message.scalar(3, _I64)
    if body_length < 0:
        raise IpcFormatError(f"IPC body length {body_length} is negative")
    if meta_end + body_length != size:
        raise IpcFormatError(
            f"IPC message declares a body of {body_length} bytes but the frame holds "
            f"{size - meta_end}"
        )
    header = message.table(2)
    if header is None:
        raise IpcFormatError("IPC message has no header")

    rows = nodes = fields = 0
    if header_type == HEADER_RECORD_BATCH:
        rows = header.scalar(0, _I64)
        if rows < 0 or rows > max_rows:
            raise IpcFormatError(f"record batch declares {rows} rows; the limit is {max_rows}")
        if header.has(3):
            raise IpcFormatError(
                "record batch uses IPC body compression, which protocol v1 forbids "
                "(a compressed buffer can declare any uncompressed size)"
            )
        # FieldNode and Buffer are 16-byte structs, so their counts are bounded by the metadata.
        nodes = header.vector(1, 16)[1]
        start, count = header.vector(2, 16)
        for i in range(count):
            offset, length = _BUFFER.unpack_from(meta, start + 16 * i)
            if offset < 0 or length < 0 or offset + length > body_length:
                raise IpcFormatError(
                    f"record batch buffer {i} (offset {offset}, length {length}) lies outside "
                    f"its body of {body_length} bytes"
                )
    elif header_type == HEADER_SCHEMA:
        if body_length != 0:
            raise IpcFormatError("schema message carries a body")
        fields = _count_fields(header)
    elif header_type == HEADER_DICTIONARY_BATCH:
        raise IpcFormatError(
            "dictionary batches are not allowed in protocol v1; decode dictionary columns"
        )
    else:
        raise IpcFormatError(
            f"IPC message type {_HEADER_NAMES.get(header_type, header_type)} is not allowed"
        )
    return MessageInfo(
        header_type=header_type,
        metadata_length=meta_len,
        body_length=body_length,
        rows=rows,
        nodes=nodes,
        fields=fields,
    )


def _count_fields(schema: _Table) -> int:
    """Count the schema's fields at every depth, refusing too many or too deep.

    Offsets may point at one child table from several places (a DAG, which pyarrow would
    expand); counting what is queued before queueing it keeps this bounded by MAX_FIELDS.
    """
    total = 0
    stack: list[tuple[_Table, int]] = []

    def queue(table: _Table, slot: int, depth: int) -> None:
        count = table.vector(slot, 4)[1]
        if count == 0:
            return
        if total + len(stack) + count > MAX_FIELDS:
            raise IpcFormatError(f"schema declares more than {MAX_FIELDS} fields (nested included)")
        if depth > MAX_NESTING:
            raise IpcFormatError(f"schema nests types more than {MAX_NESTING} levels deep")
        stack.extend((child, depth) for child in table.tables(slot))

    queue(schema, 1, 1)  # Schema.fields
    while stack:
        field, depth = stack.pop()
        total += 1
        queue(field, 5, depth + 1)  # Field.children
    return total
