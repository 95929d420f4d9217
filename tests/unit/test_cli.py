"""The CLI end to end without Docker: diagnoses instead of tracebacks, the trusted mode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from dativo.cli import main
from dativo.connectors.generate import generate_table

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "plugins"


def write_job(tmp_path: Path, data: dict[str, Any], name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def generate_job(rows: int = 10_000, **reader: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "name": "cli",
        "source": {
            "reader": {
                "type": "builtin",
                "name": "generate",
                "config": {"rows": rows, "columns": 6, "seed": 3},
                **reader,
            }
        },
        "target": {"path": "out", "writer": {"type": "builtin", "name": "parquet"}},
        "run": {"batch_size": 1000},
    }


def test_validate_bad_file_is_a_diagnosis(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_job(tmp_path, {"version": 1, "name": "x", "source": {}, "target": {}})
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert "job.yaml" in err
    assert "`source.reader`: missing" in err
    assert "Traceback" not in err


def test_run_bad_file_is_a_diagnosis(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_job(tmp_path, {**generate_job(), "colour": "blue"})
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "`colour`: unknown key" in err
    assert "Traceback" not in err


def test_in_process_run_writes_parquet_report_and_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = generate_job(rows=10_000)
    path = write_job(tmp_path, job)
    report_path = tmp_path / "report.json"
    assert main(["run", "--in-process", str(path), "--json", str(report_path)]) == 0
    captured = capsys.readouterr()
    assert "UNSANDBOXED" in captured.err
    assert "ok: cli: 10,000 rows" in captured.out
    report = json.loads(report_path.read_text())
    assert report["status"] == "succeeded"
    assert report["sandboxed"] is False
    assert report["rows"] == 10_000
    assert report["batches"] == 10
    assert sum(f["rows"] for f in report["files"]) == 10_000
    table = pq.read_table(tmp_path / "out").sort_by("id")
    assert table.equals(generate_table(10_000, 6, seed=3))


def test_in_process_failure_publishes_nothing_and_keeps_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = generate_job()
    job["source"]["reader"] = {
        "type": "python",
        "implementation": "faulty:RaisingReader",
        "path": str(FIXTURES),
        "config": {"batches": 3},
    }
    path = write_job(tmp_path, job)
    report_path = tmp_path / "report.json"
    assert main(["run", "--in-process", str(path), "--json", str(report_path)]) == 1
    err = capsys.readouterr().err
    assert "reader plugin `python:faulty:RaisingReader`" in err
    assert "the source went away (simulated)" in err
    assert "Traceback" not in err
    assert not list((tmp_path / "out").glob("*.parquet"))
    assert main(["state", "show", str(path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["saved"] is None
    assert shown["runs"][0]["status"] == "failed"
    report = json.loads(report_path.read_text())
    assert report["status"] == "failed"


def test_state_reset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_job(tmp_path, generate_job(rows=10))
    assert main(["state", "reset", str(path)]) == 0
    assert "no state to reset" in capsys.readouterr().out


def test_no_engine_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-such.sock")
    path = write_job(tmp_path, generate_job(rows=10))
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "no Docker engine answers" in err
    assert "make engine" in err
    assert "Traceback" not in err
