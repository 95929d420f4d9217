"""Supervisor rules exercised in the trusted in-process mode (no Docker needed)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from dativo.config import parse_job
from dativo.errors import PluginError
from dativo.state import StateStore
from dativo.supervisor import RunOptions, run_job

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "plugins"


def run(tmp_path: Path, reader: dict[str, Any], writer: dict[str, Any], **target: Any) -> Any:
    job = parse_job(
        {
            "version": 1,
            "name": "rules",
            "source": {"reader": reader},
            "target": {"writer": writer, **target},
        },
        base_dir=tmp_path,
    )
    return run_job(job, RunOptions(in_process=True)), job


def test_wall_clock_holds_while_data_never_pauses(tmp_path: Path) -> None:
    reader = {
        "type": "builtin",
        "name": "generate",
        "config": {"rows": 10**10, "columns": 2, "repeat_batch": True},
        "resources": {"timeout": "2s"},
    }
    started = time.monotonic()
    with pytest.raises(PluginError) as caught:
        run(tmp_path, reader, {"type": "builtin", "name": "null"})
    assert (caught.value.role, caught.value.rule) == ("reader", "timeout")
    assert time.monotonic() - started < 20


def test_writer_that_stages_nothing_loses_no_rows(tmp_path: Path) -> None:
    reader = {"type": "builtin", "name": "generate", "config": {"rows": 5000, "columns": 2}}
    writer = {"type": "python", "implementation": "faulty:ForgetfulWriter", "path": str(FIXTURES)}
    with pytest.raises(PluginError) as caught:
        run(tmp_path, reader, writer, path="out")
    assert (caught.value.role, caught.value.rule) == ("writer", "result")
    assert "0 rows but 5000 rows were sent" in str(caught.value)
    assert StateStore(tmp_path / ".dativo" / "state.db").get("rules") is None


def test_successful_run_publishes_every_row(tmp_path: Path) -> None:
    reader = {"type": "builtin", "name": "generate", "config": {"rows": 3000, "columns": 3}}
    report, _ = run(tmp_path, reader, {"type": "builtin", "name": "parquet"}, path="out")
    assert report.status == "succeeded"
    assert sum(f["rows"] for f in report.files) == 3000
    assert all((tmp_path / "out" / f["path"]).is_file() for f in report.files)
