"""The SQLite state store: save, replace, reset, history."""

from __future__ import annotations

from pathlib import Path

import pytest

from dativo.errors import StateError
from dativo.state import StateStore


def test_state_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "deep" / "state.db")
    assert store.get("job") is None
    store.save("job", {"cursor": 1}, "r1")
    store.save("job", {"cursor": 2}, "r2")
    assert store.get("job") == {"cursor": 2}
    assert StateStore(tmp_path / "deep" / "state.db").describe("job")["run_id"] == "r2"
    assert store.reset("job") is True
    assert store.reset("job") is False
    assert store.get("job") is None


def test_history(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    store.record_run("r1", "job", 1.0, "failed", {"rows": 0})
    store.record_run("r2", "job", 2.0, "succeeded", {"rows": 5})
    assert [r["run_id"] for r in store.runs("job")] == ["r2", "r1"]


def test_non_json_state_refused(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="not JSON"):
        StateStore(tmp_path / "s.db").save("job", {"x": object()}, "r")


def test_unopenable_database(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StateError, match="cannot open the state database"):
        StateStore(tmp_path / "file" / "state.db")
