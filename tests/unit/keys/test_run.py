"""Encrypted runs end to end in the trusted in-process mode (no Docker): the writer encrypts
through the key broker, the supervisor verifies and audits, `dativo decrypt` reads back.

Covers the round trip, no plaintext in any written byte, a modified byte, and each key error
(wrong, missing, revoked, service down) failing the run with nothing published."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dativo.cli import main
from dativo.config import JobConfig
from dativo.errors import PluginError
from dativo.keys import EncryptedFileError, KeyServiceError, key_service_for
from dativo.keys._file import revoke_version, rotate_key
from dativo.keys._parquet import read_encrypted
from dativo.supervisor import RunOptions, RunReport, run_job
from dativo.supervisor._audit import AUDIT_FILE, AuditLog
from tests.unit.keys.conftest import SoftHsm
from tests.unit.keys.helpers import (
    SECRET_VALUES,
    all_bytes,
    encrypted_job,
    key_file,
    source_table,
    write_source,
)


def run(job: JobConfig) -> RunReport:
    return run_job(job, RunOptions(in_process=True))


def parquet_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.parquet") if ".dativo-staging" not in p.parts)


def assert_nothing_published(out: Path) -> None:
    assert parquet_files(out) == []
    assert not (out / AUDIT_FILE).exists()
    staging = out / ".dativo-staging"
    assert not staging.exists() or [p for p in staging.iterdir() if p.is_dir()] == []


def assert_no_plaintext(root: Path, *texts: str) -> None:
    for path, data in all_bytes(root):
        for value in [*SECRET_VALUES, *texts]:
            assert value.encode() not in data, f"`{value}` in plain text in {path}"


def file_job(tmp_path: Path, **kwargs: object) -> JobConfig:
    return encrypted_job(tmp_path, {"type": "file", "path": str(key_file(tmp_path))}, **kwargs)  # type: ignore[arg-type]


def test_round_trip_no_plaintext_anywhere_and_an_audit_record_per_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    source = write_source(tmp_path)
    job = file_job(tmp_path)
    report = run(job)
    out = tmp_path / "out"
    files = parquet_files(out)
    assert len(files) == 1
    # Encrypted footer magic at both ends; unreadable without keys.
    data = files[0].read_bytes()
    assert data[:4] == b"PARE"
    assert data[-4:] == b"PARE"
    with pytest.raises(OSError, match="no decryption found"):
        pq.read_table(files[0])
    assert_no_plaintext(out, "Zanzibar-City")
    # Not in the report, the logs or the state store either.
    text = json.dumps(report.to_json()) + caplog.text
    assert not any(value in text for value in SECRET_VALUES)
    # Read back with the keys: equal to the source.
    service = key_service_for(job)
    assert read_encrypted(str(files[0]), service).equals(source)
    # Audit: one record per file, in the log and in the report, chain and digest verified.
    records = AuditLog(out).read()
    assert records == report.audit
    assert report.to_json()["audit_head"]
    (record,) = records
    assert record["file"] == files[0].name
    assert record["algorithm"] == "AES_GCM_V1"
    assert record["rows"] == 40
    assert record["run_id"] == report.run_id
    assert record["footer_key"] == {"key_id": "data", "version": "1"}
    assert record["columns"] == {
        "id": {"key_id": "data", "version": "1"},
        "email": {"key_id": "pii", "version": "1"},
        "ssn": {"key_id": "pii", "version": "1"},
        "city": {"key_id": "data", "version": "1"},
    }
    assert AuditLog(out).verify().ok
    # `dativo decrypt` reads it back too, and `dativo audit verify` agrees.
    job_file = tmp_path / "job.yaml"
    job_file.write_text(json.dumps(job_dict(tmp_path)))
    plain = tmp_path / "plain.parquet"
    assert main(["decrypt", str(out), "--job", str(job_file), "-o", str(plain)]) == 0
    assert pq.read_table(plain).equals(source)
    assert main(["decrypt", str(files[0]), "--job", str(job_file), "--head", "2"]) == 0
    assert "alice.1@secret-mail.example" in capsys.readouterr().out
    assert main(["audit", "verify", str(out)]) == 0


def job_dict(tmp_path: Path) -> dict[str, object]:
    return {
        "version": 1,
        "name": "people",
        "source": {"reader": {"type": "builtin", "name": "generate"}},
        "target": {
            "path": "out",
            "writer": {"type": "builtin", "name": "parquet"},
            "encryption": {
                "key_service": {
                    "type": "file",
                    "path": str(tmp_path / "keys" / "dativo-keys.json"),
                },
                "footer_key": "data",
                "column_keys": {"pii": ["email", "ssn"]},
            },
        },
    }


def test_with_the_footer_key_only_the_sensitive_columns_stay_closed(tmp_path: Path) -> None:
    write_source(tmp_path)
    job = file_job(tmp_path)
    run(job)
    (path,) = parquet_files(tmp_path / "out")
    service = key_service_for(job)
    # A reader holding the footer key but not `pii` reads the other columns only.
    assert read_encrypted(str(path), service, columns=["id", "city"]).num_rows == 40
    revoke_version(tmp_path / "keys" / "dativo-keys.json", "pii", 1)
    limited = key_service_for(job)
    assert read_encrypted(str(path), limited, columns=["id", "city"]).num_rows == 40
    with pytest.raises(KeyServiceError, match="key `pii`: version 1 is revoked"):
        read_encrypted(str(path), limited, columns=["email"])


def test_a_modified_byte_fails_authentication_with_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_source(tmp_path)
    job = file_job(tmp_path)
    run(job)
    (path,) = parquet_files(tmp_path / "out")
    service = key_service_for(job)
    original = path.read_bytes()
    for offset in (8, len(original) // 2, len(original) - 40):
        changed = bytearray(original)
        changed[offset] ^= 0x01
        path.write_bytes(bytes(changed))
        with pytest.raises(
            EncryptedFileError, match=r"authentication failed: .* was modified or the key is wrong"
        ):
            read_encrypted(str(path), service)
    assert main(["audit", "verify", str(tmp_path / "out")]) == 1
    assert "modified or replaced" in capsys.readouterr().err
    job_file = tmp_path / "job.yaml"
    job_file.write_text(json.dumps(job_dict(tmp_path)))
    assert main(["decrypt", str(path), "--job", str(job_file), "--head", "1"]) == 1
    err = capsys.readouterr().err
    assert "authentication failed" in err
    assert "was modified or the key is wrong" in err
    assert "Traceback" not in err


def test_a_wrong_key_cannot_read(tmp_path: Path) -> None:
    write_source(tmp_path)
    job = file_job(tmp_path)
    run(job)
    (path,) = parquet_files(tmp_path / "out")
    other_dir = tmp_path / "elsewhere"
    other_dir.mkdir()
    other = encrypted_job(other_dir, {"type": "file", "path": str(key_file(other_dir))})
    with pytest.raises(KeyServiceError, match="key `data`: version 1 does not unwrap") as info:
        read_encrypted(str(path), key_service_for(other))
    assert info.value.reason == "wrong-key"


def test_rotation_new_files_use_the_new_version_old_files_stay_readable(tmp_path: Path) -> None:
    source = write_source(tmp_path)
    job = file_job(tmp_path)
    first = run(job)
    rotate_key(tmp_path / "keys" / "dativo-keys.json", "pii")
    second = run(job)
    assert first.audit[0]["columns"]["email"]["version"] == "1"
    assert second.audit[0]["columns"]["email"]["version"] == "2"
    assert second.audit[0]["footer_key"]["version"] == "1"
    log = AuditLog(tmp_path / "out")
    assert [r["seq"] for r in log.read()] == [1, 2]
    assert log.verify().ok
    service = key_service_for(job)
    for path in parquet_files(tmp_path / "out"):
        assert read_encrypted(str(path), service).equals(source)


@pytest.mark.parametrize(
    ("change", "reason", "message"),
    [
        ("missing", "missing", "key `pii`: no such key"),
        ("revoked", "revoked", "key `pii`: version 1 is revoked"),
        ("unreadable", "config", "chmod 600"),
        ("deleted", "missing", "key file does not exist"),
    ],
)
def test_key_errors_fail_the_run_with_nothing_published_and_no_audit_record(
    tmp_path: Path, change: str, reason: str, message: str
) -> None:
    write_source(tmp_path)
    job = file_job(tmp_path)
    first = run(job)  # one good run: its file and record must stay exactly as they are
    out = tmp_path / "out"
    before = {p: p.read_bytes() for p in [*parquet_files(out), out / AUDIT_FILE]}
    path = tmp_path / "keys" / "dativo-keys.json"
    if change == "missing":
        data = json.loads(path.read_text())
        del data["keys"]["pii"]
        path.write_text(json.dumps(data))
    elif change == "revoked":
        revoke_version(path, "pii", 1)
    elif change == "unreadable":
        os.chmod(path, 0o644)
    else:
        path.unlink()
    with pytest.raises(KeyServiceError, match=message) as info:
        run(job)
    assert info.value.reason == reason
    assert {p: p.read_bytes() for p in [*parquet_files(out), out / AUDIT_FILE]} == before
    assert len(AuditLog(out).read()) == len(first.audit) == 1


def test_a_key_service_that_is_down_fails_the_run_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    write_source(tmp_path)
    job = encrypted_job(
        tmp_path, {"type": "kms", "region": "us-east-1", "endpoint_url": "http://127.0.0.1:9"}
    )
    with pytest.raises(KeyServiceError, match="cannot be reached") as info:
        run(job)
    assert info.value.reason == "unavailable"
    assert info.value.transient
    assert "key service `kms`, key `data`" in str(info.value)
    assert_nothing_published(tmp_path / "out")


def test_a_key_revoked_while_the_writer_runs_fails_with_the_key_service_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Preflight passed, then the service refuses the writer's wrap: the run fails with the
    key service's own error and publishes nothing."""
    from dativo.keys._file import FileKeys

    write_source(tmp_path)
    job = file_job(tmp_path)
    original = FileKeys.wrap

    def refusing(self: FileKeys, key_id: str, plaintext: bytes) -> str:
        revoke_version(self.path, key_id, 1)
        self._keys = FileKeys(self.path)._keys
        return original(self, key_id, plaintext)

    monkeypatch.setattr(FileKeys, "wrap", refusing)
    with pytest.raises(KeyServiceError, match="version 1 is revoked"):
        run(job)
    assert_nothing_published(tmp_path / "out")


def test_an_unknown_column_in_column_keys_fails_before_publishing(tmp_path: Path) -> None:
    write_source(tmp_path)
    job = file_job(tmp_path, column_keys={"pii": ["email", "passport"]})
    with pytest.raises(PluginError, match=r"names column.* `passport` that the data does not have"):
        run(job)
    assert_nothing_published(tmp_path / "out")


def test_the_pkcs11_key_service_runs_end_to_end(tmp_path: Path, softhsm: SoftHsm) -> None:
    softhsm.add_key("hsm-data.v1")
    softhsm.add_key("hsm-pii.v1")
    source = write_source(tmp_path)
    job = encrypted_job(
        tmp_path, softhsm.service(), footer_key="hsm-data", column_keys={"hsm-pii": ["ssn"]}
    )
    report = run(job)
    out = tmp_path / "out"
    assert_no_plaintext(out)
    assert report.audit[0]["key_service"] == "pkcs11"
    assert report.audit[0]["columns"]["ssn"] == {"key_id": "hsm-pii", "version": "1"}
    (path,) = parquet_files(out)
    service = key_service_for(job)
    try:
        assert read_encrypted(str(path), service).equals(source)
    finally:
        service.close()
    text = json.dumps(report.to_json())
    assert os.environ[softhsm.pin_env] not in text


def test_a_file_the_writer_left_unencrypted_is_refused(tmp_path: Path) -> None:
    """The supervisor's checks, on files a hostile writer could stage."""
    import pyarrow.parquet.encryption as pqe

    from dativo.keys._file import FileKeys
    from dativo.keys._parquet import inspect_encrypted

    job = file_job(tmp_path)
    keys = FileKeys(tmp_path / "keys" / "dativo-keys.json")
    table = source_table()
    plain = tmp_path / "plain.parquet"
    pq.write_table(table, plain)

    class Client(pqe.KmsClient):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()

        def wrap_key(self, key: bytes, master: str) -> str:
            return keys.wrap(master, key)

        def unwrap_key(self, wrapped: str, master: str) -> bytes:
            return keys.unwrap(wrapped)

    def write(path: Path, column_keys: dict[str, list[str]], footer: str = "data") -> None:
        factory = pqe.CryptoFactory(lambda _c: Client())
        config = pqe.EncryptionConfiguration(
            footer_key=footer, column_keys=column_keys, double_wrapping=False
        )
        props = factory.file_encryption_properties(pqe.KmsConnectionConfig(), config)
        pq.write_table(table, path, encryption_properties=props)

    half = tmp_path / "half.parquet"
    write(half, {"pii": ["email", "ssn"]})  # `id` and `city` left in plain text
    swapped = tmp_path / "swapped.parquet"
    write(swapped, {"data": ["email", "ssn", "id", "city"]})  # pii columns under `data`
    owners = {"email": "pii", "ssn": "pii"}
    spec = job.target.encryption
    assert spec is not None
    cases = [(plain, "not-encrypted"), (half, "plaintext-column"), (swapped, "key-mismatch")]
    for path, check in cases:
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(EncryptedFileError) as info:
                inspect_encrypted(fd, path.name, keys, footer_key="data", column_keys=owners)
        finally:
            os.close(fd)
        assert info.value.check == check, (path, info.value)


def test_the_job_file_refuses_encryption_it_cannot_honour(tmp_path: Path) -> None:
    from dativo.config import JobConfigError, parse_job

    base = job_dict(tmp_path)

    def target(**changes: object) -> dict[str, object]:
        data = json.loads(json.dumps(base))
        data["target"].update(changes)
        return data

    cases = [
        (target(format="iceberg", path=None, iceberg={"table": "t"}), "format: parquet"),
        (target(writer={"type": "builtin", "name": "null"}), "built-in `parquet` writer"),
        (
            target(
                writer={"type": "builtin", "name": "parquet", "config": {"partition_by": ["x"]}}
            ),
            "cannot be partitioned",
        ),
        (
            target(
                encryption={
                    "key_service": {
                        "type": "pkcs11",
                        "module": "/x.so",
                        "token": "t",
                        "pin": "1234",
                    },
                    "footer_key": "data",
                }
            ),
            "environment variable reference",
        ),
        (
            target(
                encryption={
                    "key_service": {"type": "file", "path": "k.json"},
                    "footer_key": "data",
                    "column_keys": {"a": ["email"], "b": ["email"]},
                }
            ),
            "a column has one key",
        ),
    ]
    for data, message in cases:
        with pytest.raises(JobConfigError, match=message):
            parse_job(data, base_dir=tmp_path)
    assert isinstance(pa.table({"x": [1]}), pa.Table)
