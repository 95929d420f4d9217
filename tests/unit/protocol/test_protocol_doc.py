"""docs/protocol.md against the reference implementation.

Frames are built byte by byte as the document describes them (with `struct` and `json`, never
with dativo's encoders), then handed to the reference decoders: `v1.HEADER`, `v1.Channel`,
`v1.decode_control` and `inspect_message`. The message tables of the document are parsed and
compared with the message classes of `v1.py`, so the document cannot drift from the code.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
import typing
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import BaseModel

import dativo.host
import dativo.supervisor
from dativo.config import RunSpec
from dativo.errors import ProtocolError
from dativo.protocol import IpcFormatError, inspect_message, v1
from dativo.supervisor import _publish

DOC = Path(__file__).resolve().parents[3] / "docs" / "protocol.md"
TEXT = DOC.read_text(encoding="utf-8")


def _section(number: int) -> str:
    start = TEXT.index(f"\n## {number}. ")
    end = TEXT.find("\n## ", start + 1)
    return TEXT[start : end if end != -1 else len(TEXT)]


def _subsections(text: str) -> dict[str, str]:
    """`### \\`name\\`` headings of a section, each with its text."""
    parts = re.split(r"^### `(\w+)`$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _table_after(text: str, header: str) -> list[list[str]]:
    """Rows (as cells) of the Markdown table whose header row is `header`."""
    lines = text.splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


MESSAGES = _subsections(_section(4))
FIELDS_HEADER = "| field | type | required | meaning |"


# --------------------------------------------------------------------------------------------
# Frames, byte by byte


def frame(kind: int, payload: bytes) -> bytes:
    """Section 3: kind (1 byte), 3 reserved zero bytes, u32 little-endian length, payload."""
    return bytes([kind, 0, 0, 0]) + struct.pack("<I", len(payload)) + payload


def ipc_message(metadata: bytes, body: bytes = b"", *, extra_padding: int = 0) -> bytes:
    """Section 5: FF FF FF FF, int32 metadata length (padding included), flatbuffer, body."""
    padded = metadata + b"\0" * ((-len(metadata)) % 8 + extra_padding)
    return b"\xff\xff\xff\xff" + struct.pack("<i", len(padded)) + padded + body


def split_ipc(message: bytes) -> tuple[bytes, bytes]:
    """The flatbuffer (with its padding) and the body of one encapsulated message."""
    marker, length = struct.unpack_from("<Ii", message, 0)
    assert marker == 0xFFFFFFFF
    return message[8 : 8 + length], message[8 + length :]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _receive(
    pair: tuple[socket.socket, socket.socket], data: bytes, *, max_frame_bytes: int = 1 << 20
) -> tuple[int, bytes]:
    """Write `data` raw into one end; read one frame with the reference Channel on the other."""
    sender, receiver = pair
    errors: list[BaseException] = []

    def send() -> None:
        try:
            sender.sendall(data)
        except OSError as exc:  # the receiver may stop reading at a refused header
            errors.append(exc)

    thread = threading.Thread(target=send)
    thread.start()
    try:
        kind, payload = v1.Channel(receiver, max_frame_bytes=max_frame_bytes).recv_frame()
    finally:
        receiver.shutdown(socket.SHUT_RD)
        thread.join(10)
    return kind, bytes(payload)


# --------------------------------------------------------------------------------------------
# Section 3: framing


def test_header_layout() -> None:
    raw = frame(2, b"x" * 300)
    assert len(raw) == 308
    assert v1.HEADER.size == 8
    assert v1.HEADER.unpack(raw[:8]) == (v1.KIND_ARROW, 300)
    assert v1.HEADER.pack(v1.KIND_CONTROL, 14) == bytes.fromhex("010000000e000000")
    assert (v1.KIND_CONTROL, v1.KIND_ARROW) == (1, 2)


def test_hex_example_of_the_document() -> None:
    section = _section(3)
    block = section[section.index("A CONTROL frame carrying") :].split("```")[1]
    assert bytes.fromhex(block) == frame(1, b'{"type":"bye"}')
    assert isinstance(v1.decode_control(bytes.fromhex(block)[8:]), v1.Bye)


def test_control_frame_through_the_channel(pair: tuple[socket.socket, socket.socket]) -> None:
    payload = json.dumps({"type": "log", "level": "warning", "message": "ünïcode"}).encode()
    kind, received = _receive(pair, frame(1, payload))
    assert (kind, received) == (1, payload)
    message = v1.decode_control(received)
    assert isinstance(message, v1.Log)
    assert (message.level, message.message) == ("warning", "ünïcode")


def test_control_limit_is_exactly_one_mebibyte(pair: tuple[socket.socket, socket.socket]) -> None:
    assert v1.MAX_CONTROL_BYTES == 1_048_576
    skeleton = json.dumps({"type": "log", "message": ""}).encode()
    payload = skeleton[:-2] + b"x" * (v1.MAX_CONTROL_BYTES - len(skeleton)) + skeleton[-2:]
    assert len(payload) == v1.MAX_CONTROL_BYTES
    kind, received = _receive(pair, frame(1, payload))
    assert kind == 1
    assert isinstance(v1.decode_control(received), v1.Log)


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (bytes([1, 0, 1, 0]) + struct.pack("<I", 2), "reserved bytes"),
        (bytes([3, 0, 0, 0]) + struct.pack("<I", 2), "unknown frame kind 3"),
        (bytes([0, 0, 0, 0]) + struct.pack("<I", 2), "unknown frame kind 0"),
        (bytes([1, 0, 0, 0]) + struct.pack("<I", (1 << 20) + 1), "exceeds the 1 MiB limit"),
        (bytes([2, 0, 0, 0]) + struct.pack("<I", (1 << 20) + 1), "exceeds the limit"),
    ],
)
def test_framing_violations(
    pair: tuple[socket.socket, socket.socket], header: bytes, match: str
) -> None:
    with pytest.raises(ProtocolError, match=match):
        _receive(pair, header + b"{}", max_frame_bytes=1 << 20)


def test_empty_payloads_are_never_valid() -> None:
    with pytest.raises(ProtocolError):
        v1.decode_control(b"")
    with pytest.raises(IpcFormatError):
        inspect_message(memoryview(b""), max_rows=10)


# --------------------------------------------------------------------------------------------
# Section 4: control messages


def _classes() -> dict[str, type[BaseModel]]:
    """Every control message class: the members of the `ControlMessage` union, which must be
    every message model defined in v1.py (all but the `type`-less base class)."""
    union = typing.get_args(v1.ControlMessage)[0]
    members = {cls.model_fields["type"].default: cls for cls in typing.get_args(union)}
    models = [
        obj
        for obj in vars(v1).values()
        if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__ == v1.__name__
    ]
    in_module = {m.model_fields["type"].default for m in models if "type" in m.model_fields}
    assert len(in_module) == len(models) - 1  # only the base class has no `type`
    assert set(members) == in_module
    return members


def test_document_names_exactly_the_message_types_of_v1() -> None:
    classes = set(_classes())
    summary = _table_after(_section(4), "| type | direction | when |")
    in_summary = {re.fullmatch(r"`(\w+)`", row[0])[1] for row in summary}  # type: ignore[index]
    in_tables = set()
    for text in MESSAGES.values():
        rows = _table_after(text, FIELDS_HEADER)
        type_row = next(row for row in rows if row[0] == "`type`")
        in_tables.add(re.fullmatch(r'`"(\w+)"`', type_row[3])[1])  # type: ignore[index]
    assert in_summary == classes
    assert in_tables == classes
    assert set(MESSAGES) == classes


@pytest.mark.parametrize("name", sorted(_classes()))
def test_document_fields_match_the_class(name: str) -> None:
    cls = _classes()[name]
    rows = _table_after(MESSAGES[name], FIELDS_HEADER)
    documented = {re.fullmatch(r"`(\w+)`", row[0])[1]: row[2] for row in rows}  # type: ignore[index]
    assert list(documented) == list(cls.model_fields), f"fields of `{name}`"
    for field, required in documented.items():
        assert required.split()[0] in ("yes", "no"), required
        if field == "type":
            assert required == "yes"  # the discriminator is required on the wire
        else:
            assert (required == "yes") == cls.model_fields[field].is_required(), field


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_example_json_is_accepted(name: str) -> None:
    example = re.search(r"```json\n(.*?)\n```", MESSAGES[name], re.S)
    assert example is not None, f"`{name}` has no example"
    payload = example[1].encode()
    raw = frame(1, payload)
    kind, length = struct.unpack_from("<B3xI", raw)
    assert (kind, length) == v1.HEADER.unpack(raw[:8]) == (1, len(payload))
    message = v1.decode_control(raw[8:])
    assert message.type == name
    assert isinstance(message, _classes()[name])


def test_result_example_paths_pass_the_publication_checks() -> None:
    example = re.search(r"```json\n(.*?)\n```", MESSAGES["result"], re.S)
    assert example is not None
    for entry in json.loads(example[1])["files"]:
        assert _publish._check_path(entry["path"])  # a private helper: the rule itself
    for bad in ("/abs.parquet", "a/../b", ".hidden", "a//b", "a\\b", "-x", "x" * 256):
        with pytest.raises(ValueError, match="path"):
            _publish._check_path(bad)


def test_unknown_members_and_types_are_rejected() -> None:
    with pytest.raises(ProtocolError, match="Extra inputs"):
        v1.decode_control(b'{"type": "bye", "colour": "blue"}')
    with pytest.raises(ProtocolError):
        v1.decode_control(b'{"type": "hello2"}')
    with pytest.raises(ProtocolError):
        v1.decode_control(b'{"message": "no type"}')


def test_hello_limits() -> None:
    def hello(**changes: object) -> bytes:
        data = {"type": "hello", "protocols": [1], "role": "reader", "plugin": "p", "version": "1"}
        data.update(changes)
        return json.dumps(data).encode()

    assert isinstance(v1.decode_control(hello(protocols=list(range(16)))), v1.Hello)
    assert isinstance(v1.decode_control(hello(plugin="p" * 200, version="v" * 100)), v1.Hello)
    for bad in (
        {"protocols": []},
        {"protocols": list(range(17))},
        {"plugin": "p" * 201},
        {"version": "v" * 101},
        {"role": "both"},
    ):
        with pytest.raises(ProtocolError):
            v1.decode_control(hello(**bad))


# --------------------------------------------------------------------------------------------
# Section 5: Arrow frames

SCHEMA = pa.schema([("id", pa.int64()), ("name", pa.string())])


def _batch(rows: int) -> pa.RecordBatch:
    return pa.record_batch(
        [pa.array(range(rows), pa.int64()), pa.array([f"r{i}" for i in range(rows)])],
        schema=SCHEMA,
    )


@pytest.mark.parametrize("extra_padding", [0, 8, 56])
def test_arrow_frames_built_as_documented(
    pair: tuple[socket.socket, socket.socket], extra_padding: int
) -> None:
    """Re-wrap pyarrow's flatbuffers and bodies with the documented prefix and padding."""
    schema_meta, schema_body = split_ipc(SCHEMA.serialize().to_pybytes())
    batch_meta, batch_body = split_ipc(_batch(5).serialize().to_pybytes())
    assert schema_body == b""
    schema_message = ipc_message(schema_meta, extra_padding=extra_padding)
    batch_message = ipc_message(batch_meta, batch_body, extra_padding=extra_padding)

    kind, payload = _receive(pair, frame(2, schema_message))
    assert kind == 2
    info = inspect_message(memoryview(payload), max_rows=100)
    assert (info.header_name, info.body_length, info.rows) == ("Schema", 0, 0)
    assert info.metadata_length % 8 == 0
    schema = pa.ipc.read_schema(pa.py_buffer(payload))
    assert schema.equals(SCHEMA)

    info = inspect_message(memoryview(batch_message), max_rows=100)
    assert (info.header_name, info.rows) == ("RecordBatch", 5)
    assert 8 + info.metadata_length + info.body_length == len(batch_message)
    message = pa.ipc.read_message(pa.py_buffer(batch_message))
    batch = pa.ipc.read_record_batch(message, schema)
    batch.validate(full=True)
    assert batch.equals(_batch(5))


def _flatbuffer(
    *, version: int, header_type: int, body_length: int, rows: int, compression: bool
) -> bytes:
    """A hand-made `Message` flatbuffer with the fields of the table in section 5.

    Layout: root offset; Message vtable (4) and table (16: header, bodyLength, version,
    header_type); RecordBatch vtable (40) and table (56: compression, length); an empty
    BodyCompression table (vtable 72, table 76).
    """
    buf = bytearray(80)
    struct.pack_into("<I", buf, 0, 16)
    struct.pack_into("<6H", buf, 4, 12, 20, 16, 18, 4, 8)  # version, header_type, header, bodyLen
    struct.pack_into("<i", buf, 16, 16 - 4)
    struct.pack_into("<I", buf, 20, 56 - 20)
    struct.pack_into("<q", buf, 24, body_length)
    struct.pack_into("<h", buf, 32, version)
    struct.pack_into("<B", buf, 34, header_type)
    struct.pack_into("<6H", buf, 40, 12, 16, 8, 0, 0, 4 if compression else 0)
    struct.pack_into("<i", buf, 56, 56 - 40)
    struct.pack_into("<I", buf, 60, 76 - 60)
    struct.pack_into("<q", buf, 64, rows)
    struct.pack_into("<2H", buf, 72, 4, 4)
    struct.pack_into("<i", buf, 76, 76 - 72)
    return bytes(buf)


def _hand_made(
    *,
    version: int = 4,
    header_type: int = 3,
    body: bytes = b"",
    rows: int = 7,
    compression: bool = False,
) -> memoryview:
    metadata = _flatbuffer(
        version=version,
        header_type=header_type,
        body_length=len(body),
        rows=rows,
        compression=compression,
    )
    return memoryview(ipc_message(metadata, body))


@pytest.mark.parametrize("version", [3, 4])
def test_fields_read_by_the_supervisor(version: int) -> None:
    info = inspect_message(_hand_made(version=version, body=b"\0" * 16), max_rows=1 << 26)
    assert (info.header_name, info.rows, info.body_length) == ("RecordBatch", 7, 16)
    info = inspect_message(_hand_made(version=version, header_type=1, rows=0), max_rows=10)
    assert info.header_name == "Schema"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"version": 2}, "version 2 is not supported"),
        ({"version": 5}, "version 5 is not supported"),
        ({"compression": True}, "compression"),
        ({"header_type": 2}, "dictionary batches"),
        ({"header_type": 4}, "Tensor"),
        ({"header_type": 1, "body": b"\0" * 8}, "schema message carries a body"),
        ({"rows": (1 << 26) + 1}, "the limit is 67108864"),
        ({"rows": -1}, "declares -1 rows"),
    ],
)
def test_forbidden_by_section_5(kwargs: dict[str, typing.Any], match: str) -> None:
    with pytest.raises(IpcFormatError, match=match):
        inspect_message(_hand_made(**kwargs), max_rows=1 << 26)


def test_one_message_per_frame_exactly() -> None:
    good = bytes(_hand_made(body=b"\0" * 8))
    inspect_message(memoryview(good), max_rows=10)
    with pytest.raises(IpcFormatError, match="declares a body"):
        inspect_message(memoryview(good + b"\0" * 8), max_rows=10)  # trailing bytes
    with pytest.raises(IpcFormatError, match="declares a body"):
        inspect_message(memoryview(good + good), max_rows=10)  # two messages
    with pytest.raises(IpcFormatError, match="end-of-stream"):
        inspect_message(memoryview(b"\xff\xff\xff\xff\0\0\0\0"), max_rows=10)
    forged = b"\xff\xff\xff\xff" + struct.pack("<i", 84) + good[8:]
    with pytest.raises(IpcFormatError, match="multiple of 8"):
        inspect_message(memoryview(forged), max_rows=10)
    with pytest.raises(IpcFormatError, match="0xFFFFFFFF"):
        inspect_message(memoryview(good[4:]), max_rows=10)  # the pre-0.15 format


# --------------------------------------------------------------------------------------------
# Section 8: the limits the document states


@pytest.mark.parametrize(
    ("value", "expected", "written"),
    [
        (v1.MAX_CONTROL_BYTES, 1 << 20, "1,048,576 bytes (1 MiB)"),
        (dativo.supervisor._MAX_BATCH_ROWS, 1 << 26, "67,108,864 (2^26)"),
        (RunSpec().max_frame_bytes, 128 << 20, "| 128 MiB | `run.max_frame_bytes`"),
        (RunSpec().batch_size, 65536, "| 65,536 | `run.batch_size`"),
        (RunSpec().handshake_timeout, 30.0, "| 30 s | `run.handshake_timeout`"),
        (dativo.supervisor._SHUTDOWN_GRACE, 10.0, "within 10 seconds"),
        (dativo.supervisor._LOG_BURST, 200, "burst 200, then 50/s"),
        (dativo.supervisor._LOG_PER_SECOND, 50.0, "burst 200, then 50/s"),
        (_publish._MAX_FILES, 100_000, "| files in `result` | 100,000 |"),
        (dativo.host._MAX_LOG_CHARS, 4000, "to 4,000 characters"),
        (dativo.host.DEFAULT_SOCKET, "/run/dativo/plugin.sock", "`/run/dativo/plugin.sock`"),
        (v1.PROTOCOL_VERSION, 1, '`"protocol": 1`'),
    ],
)
def test_documented_limits(value: object, expected: object, written: str) -> None:
    assert value == expected
    assert written in TEXT
