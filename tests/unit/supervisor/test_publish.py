"""Verification and publication of staged files: symlinks, lies, crashes, exactly once."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dativo.errors import PluginError
from dativo.supervisor import _publish


@pytest.fixture
def target(tmp_path: Path) -> Path:
    path = tmp_path / "target"
    path.mkdir()
    return path


def stage(target: Path, run_id: str = "run1") -> Path:
    staging = _publish.staging_root(target) / run_id
    staging.mkdir(parents=True)
    return staging


def parquet(path: Path, rows: int) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": list(range(rows))}), path)
    return {"rows": rows, "bytes": path.stat().st_size}


def entry(staging: Path, rel: str, rows: int) -> dict[str, Any]:
    return {"path": rel, **parquet(staging / rel, rows)}


def test_valid_files_are_published_and_state_saved(target: Path) -> None:
    staging = stage(target)
    files = [entry(staging, "a.parquet", 3), entry(staging, "k=1/b.parquet", 2)]
    staged = _publish.validate_staged(staging, files, rows_sent=5, plugin="w")
    saved: list[tuple[dict[str, Any], str]] = []
    _publish.publish(
        target,
        "run1",
        staged,
        job="j",
        state={"c": 1},
        save_state=lambda s, r: saved.append((s, r)),
    )
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*.parquet")) == [
        "a.parquet",
        "k=1/b.parquet",
    ]
    assert saved == [({"c": 1}, "run1")]
    assert list(_publish.staging_root(target).iterdir()) == []


@pytest.mark.parametrize(
    ("rel", "message"),
    [
        ("/etc/passwd", "not a relative POSIX path"),
        ("../escape.parquet", "unsafe component"),
        ("a/./b.parquet", "unsafe component"),
        (".hidden.parquet", "unsafe component"),
        ("a\\b.parquet", "not a relative POSIX path"),
        ("", "not a relative POSIX path"),
    ],
)
def test_unsafe_paths_refused(target: Path, rel: str, message: str) -> None:
    staging = stage(target)
    with pytest.raises(PluginError, match=message) as caught:
        _publish.validate_staged(
            staging, [{"path": rel, "rows": 1, "bytes": 1}], rows_sent=1, plugin="w"
        )
    assert caught.value.rule == "result"


def test_symlinked_file_refused(target: Path, tmp_path: Path) -> None:
    staging = stage(target)
    secret = tmp_path / "secret.parquet"
    info = parquet(secret, 1)
    (staging / "out.parquet").symlink_to(secret)
    with pytest.raises(PluginError, match="cannot be opened safely"):
        _publish.validate_staged(
            staging, [{"path": "out.parquet", **info}], rows_sent=1, plugin="w"
        )


def test_symlinked_directory_refused(target: Path, tmp_path: Path) -> None:
    staging = stage(target)
    elsewhere = tmp_path / "elsewhere"
    info = parquet(elsewhere / "f.parquet", 1)
    (staging / "k=1").symlink_to(elsewhere)
    with pytest.raises(PluginError, match="cannot be opened safely"):
        _publish.validate_staged(
            staging, [{"path": "k=1/f.parquet", **info}], rows_sent=1, plugin="w"
        )


def test_size_row_and_total_lies_refused(target: Path) -> None:
    staging = stage(target)
    good = entry(staging, "a.parquet", 3)
    with pytest.raises(PluginError, match="bytes, reported"):
        _publish.validate_staged(
            staging, [{**good, "bytes": good["bytes"] + 1}], rows_sent=3, plugin="w"
        )
    with pytest.raises(PluginError, match="holds 3 rows, reported 4"):
        _publish.validate_staged(staging, [{**good, "rows": 4}], rows_sent=4, plugin="w")
    with pytest.raises(PluginError, match="hold 3 rows but 10 rows were sent"):
        _publish.validate_staged(staging, [good], rows_sent=10, plugin="w")
    with pytest.raises(PluginError, match="twice"):
        _publish.validate_staged(staging, [good, good], rows_sent=6, plugin="w")


def test_not_parquet_refused(target: Path) -> None:
    staging = stage(target)
    (staging / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(PluginError, match="not a readable Parquet file"):
        _publish.validate_staged(
            staging, [{"path": "x.parquet", "rows": 1, "bytes": 18}], rows_sent=1, plugin="w"
        )


def test_existing_file_is_never_overwritten(target: Path) -> None:
    staging = stage(target)
    staged = _publish.validate_staged(
        staging, [entry(staging, "a.parquet", 1)], rows_sent=1, plugin="w"
    )
    (target / "a.parquet").write_text("precious")
    with pytest.raises(PluginError, match="refusing to overwrite"):
        _publish.publish(target, "run1", staged, job="j", state=None, save_state=lambda s, r: None)
    assert (target / "a.parquet").read_text() == "precious"


def test_interrupted_publication_is_rolled_forward_once(target: Path) -> None:
    staging = stage(target)
    entry(staging, "a.parquet", 2)
    entry(staging, "b.parquet", 3)
    # A crash after the journal and the first rename, before the state was saved:
    journal = _publish.staging_root(target) / "run1.publish.json"
    journal.write_text(
        json.dumps(
            {"run_id": "run1", "job": "j", "files": ["a.parquet", "b.parquet"], "state": {"c": 9}}
        )
    )
    os.rename(staging / "a.parquet", target / "a.parquet")
    saved: list[Any] = []
    rolled = _publish.recover(
        target, job="j", is_alive=lambda r: False, save_state=lambda s, r: saved.append((s, r))
    )
    assert rolled == ["run1"]
    assert saved == [({"c": 9}, "run1")]
    assert sorted(p.name for p in target.glob("*.parquet")) == ["a.parquet", "b.parquet"]
    assert not journal.exists()
    assert (
        _publish.recover(
            target, job="j", is_alive=lambda r: False, save_state=lambda s, r: saved.append((s, r))
        )
        == []
    )
    assert len(saved) == 1


def test_recovery_deletes_staging_of_dead_runs_only(target: Path) -> None:
    dead = stage(target, "dead")
    alive = stage(target, "alive")
    (dead / "x.parquet").write_text("half")
    (alive / "y.parquet").write_text("busy")
    _publish.recover(target, job="j", is_alive=lambda r: r == "alive", save_state=lambda s, r: None)
    assert not dead.exists()
    assert (alive / "y.parquet").exists()


def test_other_jobs_journals_are_left_alone(target: Path) -> None:
    stage(target, "other")
    journal = _publish.staging_root(target) / "other.publish.json"
    journal.write_text(
        json.dumps({"run_id": "other", "job": "someone-else", "files": [], "state": None})
    )
    assert (
        _publish.recover(target, job="j", is_alive=lambda r: False, save_state=lambda s, r: None)
        == []
    )
    assert journal.exists()
