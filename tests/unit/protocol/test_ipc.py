"""The supervisor's own checks of Arrow IPC messages, on valid and forged bytes."""

from __future__ import annotations

import contextlib
import struct

import pyarrow as pa
import pytest

from dativo.protocol import IpcFormatError, inspect_message

SCHEMA = pa.schema([("id", pa.int64()), ("name", pa.string())])


def _batch(rows: int = 10) -> pa.RecordBatch:
    return pa.record_batch(
        [pa.array(range(rows), pa.int64()), pa.array([str(i) for i in range(rows)])],
        schema=SCHEMA,
    )


def _view(data: bytes | pa.Buffer) -> memoryview:
    return memoryview(bytes(data))


def test_schema_and_batch_are_accepted() -> None:
    info = inspect_message(_view(SCHEMA.serialize()), max_rows=100)
    assert info.header_name == "Schema"
    info = inspect_message(_view(_batch(10).serialize()), max_rows=100)
    assert (info.header_name, info.rows) == ("RecordBatch", 10)
    assert info.body_length > 0


def test_row_limit() -> None:
    with pytest.raises(IpcFormatError, match="declares 10 rows; the limit is 5"):
        inspect_message(_view(_batch(10).serialize()), max_rows=5)


def test_missing_continuation_marker() -> None:
    data = bytearray(_batch().serialize())
    data[0:4] = b"\x00\x00\x00\x00"
    with pytest.raises(IpcFormatError, match="0xFFFFFFFF"):
        inspect_message(memoryview(data), max_rows=100)


def test_end_of_stream_marker_refused() -> None:
    with pytest.raises(IpcFormatError, match="end-of-stream"):
        inspect_message(memoryview(b"\xff\xff\xff\xff\x00\x00\x00\x00"), max_rows=100)


@pytest.mark.parametrize("cut", [4, 9, 40, -1])
def test_truncated_message(cut: int) -> None:
    data = bytes(_batch().serialize())[:cut]
    with pytest.raises(IpcFormatError):
        inspect_message(memoryview(data), max_rows=100)


def test_forged_metadata_length() -> None:
    data = bytearray(_batch().serialize())
    struct.pack_into("<i", data, 4, 1 << 30)
    with pytest.raises(IpcFormatError, match="metadata declares"):
        inspect_message(memoryview(data), max_rows=100)


def test_trailing_bytes_refused() -> None:
    data = bytes(_batch().serialize()) + b"\0" * 8
    with pytest.raises(IpcFormatError, match="declares a body"):
        inspect_message(memoryview(data), max_rows=100)


def test_huge_declared_body_refused() -> None:
    data = bytearray(_batch().serialize())
    meta_len = struct.unpack_from("<i", data, 4)[0]
    body = len(data) - 8 - meta_len
    # Find the body length field in the metadata and blow it up.
    needle = struct.pack("<q", body)
    at = data.index(needle, 8, 8 + meta_len)
    struct.pack_into("<q", data, at, 1 << 40)
    with pytest.raises(IpcFormatError, match="declares a body"):
        inspect_message(memoryview(data), max_rows=100)


def test_corrupt_flatbuffer_offsets() -> None:
    data = bytearray(_batch().serialize())
    struct.pack_into("<I", data, 8, 0x7FFFFFF0)  # root table offset far outside
    with pytest.raises(IpcFormatError, match="outside the metadata"):
        inspect_message(memoryview(data), max_rows=100)


def test_random_metadata_never_crashes() -> None:
    import random

    rng = random.Random(7)
    base = bytes(_batch().serialize())
    meta_len = struct.unpack_from("<i", base, 4)[0]
    for _ in range(2000):
        data = bytearray(base)
        for _ in range(rng.randint(1, 8)):
            data[8 + rng.randrange(meta_len)] = rng.randrange(256)
        with contextlib.suppress(IpcFormatError):
            inspect_message(memoryview(data), max_rows=1 << 20)


def test_compressed_batches_refused() -> None:
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_stream(sink, SCHEMA, options=options) as writer:
        writer.write_batch(_batch(1000))
    stream = sink.getvalue()
    reader = pa.ipc.MessageReader.open_stream(stream)
    reader.read_next_message()  # schema
    message = reader.read_next_message()
    with pytest.raises(IpcFormatError, match="compression"):
        inspect_message(memoryview(bytes(message.serialize())), max_rows=10_000)


def test_dictionary_batches_refused() -> None:
    schema = pa.schema([("d", pa.dictionary(pa.int32(), pa.string()))])
    batch = pa.record_batch([pa.array(["a", "b", "a"]).dictionary_encode()], schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch)
    reader = pa.ipc.MessageReader.open_stream(sink.getvalue())
    reader.read_next_message()
    message = reader.read_next_message()
    assert message.type == "dictionary"
    with pytest.raises(IpcFormatError, match="dictionary"):
        inspect_message(memoryview(bytes(message.serialize())), max_rows=100)
