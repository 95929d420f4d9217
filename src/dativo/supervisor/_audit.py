"""The audit log of encrypted output: one hash-chained JSON record per published file.

`_dativo_audit.jsonl` sits next to the data (the target directory, or the same S3 prefix).
Each line is one record: the file, its rows, the SHA-256 of its ciphertext, the algorithm,
the master key id and version of the footer and of every column, the run id, the job and the
time; `seq` counts records from 1 and `prev` is the SHA-256 of the previous record's canonical
JSON (sorted keys, no spaces, UTF-8), `GENESIS` for the first. Changing, removing or inserting
any record breaks the chain at the record after it; `verify` also re-hashes every file.
Truncating the newest records is detected against a known head (`audit_head` of a run report).

Records travel in the publish journal, so a crash between publishing and appending is
finished by the next run; a record already in the log (same run and file) is not appended
twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from dativo.errors import DativoError

__all__ = ["AUDIT_FILE", "GENESIS", "AuditError", "AuditLog", "canonical", "record_hash"]

AUDIT_FILE = "_dativo_audit.jsonl"
GENESIS = "0" * 64
_CHUNK = 8 << 20


class AuditError(DativoError):
    """The audit log cannot be read or written."""


def canonical(record: dict[str, Any]) -> bytes:
    """The bytes a record is hashed as."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(record)).hexdigest()


@dataclass
class Verification:
    """What `AuditLog.verify` found."""

    records: int = 0
    files_checked: int = 0
    head: str = GENESIS
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class AuditLog:
    """The audit log at a local directory or an `s3://bucket/prefix`."""

    def __init__(self, location: str | Path) -> None:
        self.location = str(location)
        if self.location.startswith("s3://"):
            from dativo.lake._s3 import s3_filesystem, split_s3_url

            self._fs: pafs.FileSystem = s3_filesystem()
            self._base = split_s3_url(self.location)
        else:
            self._fs = pafs.LocalFileSystem()
            self._base = str(Path(self.location).resolve())
        self.path = f"{self._base}/{AUDIT_FILE}"

    def _read_bytes(self) -> bytes:
        try:
            info = self._fs.get_file_info(self.path)
            if info.type == pafs.FileType.NotFound:
                return b""
            with self._fs.open_input_stream(self.path) as stream:
                return bytes(stream.read())
        except OSError as exc:
            raise AuditError(
                f"cannot read the audit log {self.path}: {exc}", transient=True
            ) from None

    def read(self) -> list[dict[str, Any]]:
        """Every record, in order."""
        records = []
        for number, line in enumerate(self._read_bytes().splitlines(), 1):
            try:
                record = json.loads(line)
            except ValueError:
                raise AuditError(f"{self.path} line {number} is not JSON") from None
            if not isinstance(record, dict):
                raise AuditError(f"{self.path} line {number} is not a JSON object")
            records.append(record)
        return records

    def append(self, entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Chain and append `entries` (records without `seq`/`prev`); return them chained.

        Entries whose run and file are already in the log are returned as found, not added.
        """
        existing = self.read()
        done = {(r.get("run_id"), r.get("file")): r for r in existing}
        head = record_hash(existing[-1]) if existing else GENESIS
        seq = len(existing)
        out: list[dict[str, Any]] = []
        added: list[dict[str, Any]] = []
        for entry in entries:
            found = done.get((entry.get("run_id"), entry.get("file")))
            if found is not None:
                out.append(found)
                continue
            seq += 1
            record = {**entry, "seq": seq, "prev": head}
            head = record_hash(record)
            out.append(record)
            added.append(record)
        if added:
            body = b"".join(canonical(r) + b"\n" for r in [*existing, *added])
            self._write(body)
        return out

    def _write(self, body: bytes) -> None:
        try:
            if isinstance(self._fs, pafs.LocalFileSystem):
                path = Path(self.path)
                tmp = path.with_name(f".{path.name}.tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(body)
                    handle.flush()
                    os.fsync(handle.fileno())
                tmp.replace(path)
            else:
                # An S3 object is replaced whole and atomically (objects have no append).
                with self._fs.open_output_stream(self.path) as out:
                    out.write(body)
        except OSError as exc:
            raise AuditError(
                f"cannot write the audit log {self.path}: {exc}", transient=True
            ) from None

    def _file_digest(self, rel: str) -> str | None:
        path = f"{self._base}/{rel}"
        digest = hashlib.sha256()
        try:
            with self._fs.open_input_stream(path) as stream:
                while chunk := stream.read(_CHUNK):
                    digest.update(chunk)
        except (FileNotFoundError, OSError):
            return None
        return digest.hexdigest()

    def verify(self, *, check_files: bool = True, expect_head: str | None = None) -> Verification:
        """Check the chain and, unless told not to, every file's ciphertext digest."""
        result = Verification()
        records = self.read()
        head = GENESIS
        for number, record in enumerate(records, 1):
            where = f"record {number} (file `{record.get('file')}`)"
            if record.get("seq") != number:
                result.problems.append(f"{where}: `seq` is {record.get('seq')}, expected {number}")
            if record.get("prev") != head:
                result.problems.append(
                    f"{where}: the chain is broken: `prev` does not match the hash of record "
                    f"{number - 1}, which was changed, removed or inserted"
                )
            head = record_hash(record)
            if check_files:
                rel = record.get("file")
                if not isinstance(rel, str) or rel.startswith("/") or ".." in rel.split("/"):
                    result.problems.append(f"{where}: unsafe file path")
                    continue
                digest = self._file_digest(rel)
                result.files_checked += 1
                if digest is None:
                    result.problems.append(f"{where}: the file is missing")
                elif digest != record.get("sha256"):
                    result.problems.append(
                        f"{where}: the file's SHA-256 differs from the recorded one: the file "
                        "was modified or replaced"
                    )
        result.records = len(records)
        result.head = head
        if expect_head is not None and expect_head != head:
            result.problems.append(
                f"the log's head is {head}, expected {expect_head}: records were added, "
                "changed or removed at the end"
            )
        return result
