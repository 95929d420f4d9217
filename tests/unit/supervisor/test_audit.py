"""The audit log: hash chain, idempotent appends, and tampering of any record or file."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from dativo.cli import main
from dativo.supervisor._audit import AUDIT_FILE, GENESIS, AuditLog, record_hash


def entry(run: str, name: str, digest: str) -> dict[str, object]:
    return {"run_id": run, "file": name, "sha256": digest, "rows": 1}


def make_log(tmp_path: Path, count: int = 4) -> AuditLog:
    import hashlib

    for i in range(count):
        (tmp_path / f"f{i}.parquet").write_bytes(f"cipher-{i}".encode())
    log = AuditLog(tmp_path)
    for i in range(count):
        digest = hashlib.sha256(f"cipher-{i}".encode()).hexdigest()
        log.append([entry(f"run-{i // 2}", f"f{i}.parquet", digest)])
    return log


def test_records_are_chained_from_the_genesis_value(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    records = log.read()
    assert [r["seq"] for r in records] == [1, 2, 3, 4]
    assert records[0]["prev"] == GENESIS
    for before, after in itertools.pairwise(records):
        assert after["prev"] == record_hash(before)
    result = log.verify()
    assert result.ok, result.problems
    assert (result.records, result.files_checked, result.head) == (4, 4, record_hash(records[-1]))


def test_appending_the_same_run_and_file_again_adds_nothing(tmp_path: Path) -> None:
    log = make_log(tmp_path, 2)
    before = (tmp_path / AUDIT_FILE).read_bytes()
    again = log.append([entry("run-0", "f1.parquet", "x")])
    assert again[0]["seq"] == 2
    assert (tmp_path / AUDIT_FILE).read_bytes() == before


@pytest.mark.parametrize("index", [0, 1, 2])
def test_changing_any_record_breaks_the_chain(tmp_path: Path, index: int) -> None:
    log = make_log(tmp_path)
    lines = (tmp_path / AUDIT_FILE).read_text().splitlines()
    record = json.loads(lines[index])
    record["rows"] = 999
    lines[index] = json.dumps(record)
    (tmp_path / AUDIT_FILE).write_text("\n".join(lines) + "\n")
    result = log.verify()
    assert not result.ok
    assert f"record {index + 2}" in result.problems[0]
    assert "chain is broken" in result.problems[0]


def test_removing_a_record_or_the_last_ones_is_detected(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    head = log.verify().head
    lines = (tmp_path / AUDIT_FILE).read_text().splitlines()
    (tmp_path / AUDIT_FILE).write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    assert not log.verify().ok
    (tmp_path / AUDIT_FILE).write_text("\n".join(lines[:3]) + "\n")
    assert log.verify().ok  # a shorter chain is consistent in itself...
    truncated = log.verify(expect_head=head)  # ...but not with the head a report recorded
    assert not truncated.ok
    assert "at the end" in truncated.problems[0]


def test_a_modified_or_missing_file_is_detected(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    (tmp_path / "f2.parquet").write_bytes(b"cipher-X")
    (tmp_path / "f3.parquet").unlink()
    problems = log.verify().problems
    assert any("f2.parquet" in p and "modified or replaced" in p for p in problems)
    assert any("f3.parquet" in p and "missing" in p for p in problems)
    assert log.verify(check_files=False).ok


def test_the_cli_verifies_and_fails_on_tampering(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_log(tmp_path)
    assert main(["audit", "verify", str(tmp_path)]) == 0
    assert "4 record(s), chain intact" in capsys.readouterr().out
    (tmp_path / "f0.parquet").write_bytes(b"tampered")
    assert main(["audit", "verify", str(tmp_path)]) == 1
    assert "modified or replaced" in capsys.readouterr().err
