"""Mutation fuzzing of the relay's decoding path, in this process (no engine needed).

Thousands of corrupted copies of valid schema and record batch frames go through the very
code that relays a reader's stream (`_Run._pump`, over socket pairs). Each must be relayed or
refused with a PluginError: no other exception, no crash of this process (a crash in pyarrow
would kill pytest), and no allocation beyond a bound.
"""

from __future__ import annotations

import random
import socket
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from dativo.config import parse_job
from dativo.errors import PluginError
from dativo.protocol import v1
from dativo.sandbox import ExitInfo
from dativo.state import StateStore
from dativo.supervisor import RunOptions, RunReport, _Run, _Session
from dativo.supervisor._plugins import resolve
from tests.security.conftest import peak_rss_mib

pytestmark = pytest.mark.security

SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("name", pa.string()),
        ("tags", pa.list_(pa.string())),
        ("point", pa.struct([("x", pa.float64()), ("y", pa.float64())])),
        ("view", pa.string_view()),
    ]
)


def _batch() -> pa.RecordBatch:
    return pa.record_batch(
        [
            pa.array([1, None, 3]),
            pa.array(["a", "bb", None]),
            pa.array([["x"], [], ["y", "z"]]),
            pa.array([{"x": 1.0, "y": 2.0}, None, {"x": 3.0, "y": 4.0}]),
            pa.array(["short", "a string longer than twelve bytes", None], pa.string_view()),
        ],
        schema=SCHEMA,
    )


@dataclass
class _Idle:
    """A plugin process that is neither a container nor a thread: it just "runs"."""

    launch: Any

    def exit_info(self) -> ExitInfo | None:
        return None

    def wait(self, timeout: float) -> ExitInfo | None:
        return None

    def logs(self) -> str:
        return ""

    def stop(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {}


@pytest.fixture(scope="module")
def relay(session_dir: Path) -> Any:
    """`relay(frames)`: what `_pump` does with these reader frames (then `end`)."""
    base = Path(tempfile.mkdtemp(prefix="fuzz-", dir=session_dir))
    job = parse_job(
        {
            "version": 1,
            "name": "fuzz",
            "source": {"reader": {"type": "builtin", "name": "generate"}},
            "target": {"writer": {"type": "builtin", "name": "null"}},
        },
        base_dir=base,
    )
    launches = {role: resolve(job, role, None) for role in ("reader", "writer")}

    def run(frames: list[bytes]) -> PluginError | None:
        run = _Run(job, RunOptions(), RunReport(run_id="fuzz", job="fuzz"), StateStore(base / "s"))
        reader_sock, reader_peer = socket.socketpair()
        writer_sock, writer_peer = socket.socketpair()

        def feed() -> None:
            try:
                for frame in frames:
                    reader_peer.sendall(frame)
                reader_peer.sendall(v1.encode_control(v1.End()))
            except OSError:
                pass  # the relay refused and closed first

        def drain() -> None:
            try:
                while writer_peer.recv(1 << 20):
                    pass
            except OSError:
                pass

        threads = [threading.Thread(target=feed), threading.Thread(target=drain)]
        for thread in threads:
            thread.start()
        sessions = {
            role: _Session(
                launches[role],
                _Idle(launches[role]),  # type: ignore[arg-type]
                v1.Channel(sock, max_frame_bytes=1 << 24),
            )
            for role, sock in (("reader", reader_sock), ("writer", writer_sock))
        }
        try:
            run._pump(sessions["reader"], sessions["writer"])
            return None
        except PluginError as exc:
            return exc
        finally:
            for session in sessions.values():
                session.channel.close()  # the peers see EOF, and their threads end
            for thread in threads:
                thread.join(10)
            reader_peer.close()
            writer_peer.close()

    return run


def _arrow(payload: bytes) -> bytes:
    return v1.HEADER.pack(v1.KIND_ARROW, len(payload)) + payload


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four byte flips or extreme values over fields and offsets; sometimes truncated."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(out) - 8) & ~3
        if rng.random() < 0.6:
            out[at + rng.randrange(4)] = rng.randrange(256)
        else:
            value = rng.choice([0, 1, -1, 0x7FFFFFFF, 0x80000000, 1 << 40, -(1 << 62)])
            if rng.random() < 0.5:
                struct.pack_into("<Q", out, at, value & (1 << 64) - 1)
            else:
                struct.pack_into("<I", out, at, value & (1 << 32) - 1)
    if rng.random() < 0.15:
        del out[rng.randrange(1, len(out)) :]
    return bytes(out)


def test_the_valid_stream_is_relayed(relay: Any) -> None:
    assert relay([_arrow(SCHEMA.serialize().to_pybytes()), _arrow(_batch().serialize())]) is None


@pytest.mark.parametrize("target", ["schema", "batch"])
def test_mutated_frames_are_relayed_or_refused_cleanly(relay: Any, target: str) -> None:
    rng = random.Random(20260101)
    schema = SCHEMA.serialize().to_pybytes()
    batch = _batch().serialize().to_pybytes()
    refused = 0
    for _ in range(1500):
        if target == "schema":
            frames = [_arrow(_mutate(schema, rng))]
        else:
            frames = [_arrow(schema), _arrow(_mutate(batch, rng))]
        error = relay(frames)  # anything but None or a PluginError fails the test here
        if error is not None:
            refused += 1
            assert error.rule in {"arrow", "schema", "protocol"}, str(error)
    assert refused > 1000  # most mutations are caught; the rest decode to valid data
    assert peak_rss_mib() < 1024
