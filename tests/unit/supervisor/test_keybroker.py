"""The key broker: wraps for the writer, refuses unwrap, unknown keys and malformed or
oversized requests, and records a key service failure."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from dativo.keys import parse_wrapped
from dativo.keys._file import FileKeys, revoke_version
from dativo.protocol.keys import MAX_LINE, BrokerError, wrap_key
from dativo.supervisor._keybroker import KeyBroker
from tests.unit.keys.helpers import key_file


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[KeyBroker, FileKeys]]:
    keys = FileKeys(key_file(tmp_path))
    sockets = tmp_path / "sock"
    sockets.mkdir()
    served = KeyBroker(keys, ["data", "pii"], sockets)
    served.start()
    yield served, keys
    served.close()


def ask(path: Path, payload: bytes) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(15)
        sock.connect(str(path))
        with contextlib.suppress(BrokenPipeError):
            sock.sendall(payload)
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return json.loads(data)  # type: ignore[no-any-return]


def test_wrap_returns_a_key_only_the_key_service_unwraps(
    broker: tuple[KeyBroker, FileKeys],
) -> None:
    served, keys = broker
    wrapped = wrap_key(str(served.path), "pii", b"k" * 32)
    assert parse_wrapped(wrapped, service="file").key_id == "pii"
    assert keys.unwrap(wrapped) == b"k" * 32
    assert served.report()["wrapped"] == [{"key_id": "pii", "version": "1", "data_keys": 1}]
    assert served.path.stat().st_mode & 0o777 == 0o666


def test_unwrap_is_refused_whatever_is_asked(broker: tuple[KeyBroker, FileKeys]) -> None:
    served, keys = broker
    wrapped = keys.wrap("pii", b"s" * 32)
    for request in (
        {"op": "unwrap", "key_id": "pii", "wrapped": wrapped},
        {"op": "decrypt", "key_id": "pii", "key": base64.b64encode(b"x" * 32).decode()},
        {"op": "wrap", "key_id": "pii", "key": base64.b64encode(b"x" * 32).decode(), "x": 1},
    ):
        answer = ask(served.path, json.dumps(request).encode() + b"\n")
        assert answer["ok"] is False
        assert base64.b64encode(b"s" * 32).decode() not in json.dumps(answer)
    assert served.refused == 3


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"not json\n", "not JSON"),
        (b"[1, 2]\n", "not a JSON object"),
        (b'{"op": "wrap", "key_id": "pii", "key": "***"}\n', "not base64"),
        (
            json.dumps(
                {"op": "wrap", "key_id": "pii", "key": base64.b64encode(b"x" * 7).decode()}
            ).encode()
            + b"\n",
            "16, 24 or 32 bytes",
        ),
        (
            json.dumps(
                {"op": "wrap", "key_id": "other", "key": base64.b64encode(b"x" * 32).decode()}
            ).encode()
            + b"\n",
            "not one of this job's master keys",
        ),
        (b"{" + b" " * (MAX_LINE + 10) + b"}\n", "longer than"),
    ],
)
def test_malformed_oversized_and_foreign_requests_are_refused(
    broker: tuple[KeyBroker, FileKeys], payload: bytes, message: str
) -> None:
    served, _ = broker
    answer = ask(served.path, payload)
    assert answer["ok"] is False
    assert message in str(answer["error"])
    # The broker serves on after a bad request.
    assert wrap_key(str(served.path), "data", b"d" * 16)


def test_a_key_service_failure_is_answered_and_kept_for_the_run(
    tmp_path: Path, broker: tuple[KeyBroker, FileKeys]
) -> None:
    served, keys = broker
    revoke_version(keys.path, "pii", 1)
    served.service = FileKeys(keys.path)
    with pytest.raises(BrokerError, match="version 1 is revoked"):
        wrap_key(str(served.path), "pii", b"k" * 32)
    assert served.failure is not None
    assert served.failure.reason == "revoked"


def test_a_closed_broker_answers_nothing(broker: tuple[KeyBroker, FileKeys]) -> None:
    served, _ = broker
    served.close()
    with pytest.raises(BrokerError, match="cannot reach"):
        wrap_key(str(served.path), "pii", b"k" * 32, timeout=2)


def test_the_number_of_wraps_per_run_is_bounded(
    broker: tuple[KeyBroker, FileKeys], monkeypatch: pytest.MonkeyPatch
) -> None:
    served, _ = broker
    monkeypatch.setattr("dativo.supervisor._keybroker.MAX_WRAPS", 2)
    wrap_key(str(served.path), "pii", b"k" * 32)
    wrap_key(str(served.path), "pii", b"k" * 32)
    with pytest.raises(BrokerError, match="more than 2 data keys"):
        wrap_key(str(served.path), "pii", b"k" * 32)
