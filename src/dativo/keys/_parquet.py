"""Reading and checking encrypted Parquet with a key service: the trusted side of encryption.

The supervisor uses `inspect_encrypted` before it publishes a writer's file: the footer must
be encrypted (`PARE` magic) and authenticate under a data key that one of the job's master keys
unwraps, the row count must match, and every column's metadata must be encrypted under the
master key the job assigns to it. `read_encrypted` is what `dativo decrypt` reads with.
Unwrapped data keys stay in this process's memory, cached per file only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pqe

from dativo.keys._base import EncryptedFileError, KeyService, KeyServiceError
from dativo.keys._wrapped import parse_wrapped

__all__ = ["ALGORITHM", "EncryptedFile", "KeyUse", "inspect_encrypted", "read_encrypted"]

ALGORITHM = "AES_GCM_V1"
# A file with an encrypted footer starts and ends with `PARE` (plain Parquet: `PAR1`).
_ENCRYPTED_FOOTER_MAGIC = b"PARE"
_CHUNK = 8 << 20


@dataclass(frozen=True)
class KeyUse:
    """A master key version that protects part of a file."""

    key_id: str
    version: str

    def to_json(self) -> dict[str, str]:
        return {"key_id": self.key_id, "version": self.version}


@dataclass
class EncryptedFile:
    """What `inspect_encrypted` found in one file."""

    rows: int
    sha256: str
    footer: KeyUse
    columns: dict[str, KeyUse] = field(default_factory=dict)  # top-level column -> key


class _ServiceKmsClient(pqe.KmsClient):  # type: ignore[misc]
    """pyarrow's KMS client interface, unwrapping with a key service; records what it used."""

    def __init__(self, service: KeyService, used: list[KeyUse], errors: list[Exception]) -> None:
        super().__init__()
        self._service = service
        self._used = used
        self._errors = errors
        self._cache: dict[str, bytes] = {}

    def wrap_key(self, key_bytes: bytes, master_key_identifier: str) -> str:
        raise KeyServiceError(
            "reading never wraps keys", service=self._service.name, reason="refused"
        )

    def unwrap_key(self, wrapped_key: str, master_key_identifier: str) -> bytes:
        try:
            parsed = parse_wrapped(wrapped_key, service=self._service.name)
            if parsed.key_id != master_key_identifier:
                raise KeyServiceError(
                    f"the file names master key `{master_key_identifier}` but its data key is "
                    f"wrapped by `{parsed.key_id}`",
                    service=self._service.name,
                    reason="malformed",
                    key_id=master_key_identifier,
                )
            self._used.append(KeyUse(parsed.key_id, parsed.version))
            key = self._cache.get(wrapped_key)
            if key is None:
                key = self._service.unwrap(wrapped_key)
                self._cache[wrapped_key] = key
            return key
        except Exception as exc:
            self._errors.append(exc)
            raise


def _properties(service: KeyService, used: list[KeyUse], errors: list[Exception]) -> Any:
    factory = pqe.CryptoFactory(lambda _config: _ServiceKmsClient(service, used, errors))
    return factory.file_decryption_properties(
        pqe.KmsConnectionConfig(), pqe.DecryptionConfiguration()
    )


def _failure(shown: str, exc: Exception, errors: list[Exception]) -> Exception:
    """The clearest error for a failed read: a key service's own, else authentication."""
    for error in errors:
        if isinstance(error, KeyServiceError):
            return error
    text = str(exc)
    if "no decryption found" in text or "not encrypted" in text.lower():
        return EncryptedFileError(
            f"`{shown}` cannot be read: no keys were given for an encrypted file",
            path=shown,
            check="unreadable",
        )
    return EncryptedFileError(
        f"authentication failed: `{shown}` was modified or the key is wrong",
        path=shown,
        check="authentication",
    )


def _digest_and_magic(handle: BinaryIO, shown: str) -> str:
    handle.seek(0)
    digest = hashlib.sha256()
    head = handle.read(4)
    digest.update(head)
    tail = head
    while chunk := handle.read(_CHUNK):
        digest.update(chunk)
        tail = (tail + chunk)[-4:]
    if head != _ENCRYPTED_FOOTER_MAGIC or tail != _ENCRYPTED_FOOTER_MAGIC:
        raise EncryptedFileError(
            f"`{shown}` is not Parquet with an encrypted footer (magic "
            f"`{head.decode('latin-1')}`...`{tail.decode('latin-1')}`, expected `PARE`...`PARE`); "
            "refusing to publish it",
            path=shown,
            check="not-encrypted",
        )
    handle.seek(0)
    return digest.hexdigest()


def inspect_encrypted(
    fd: int,
    shown: str,
    service: KeyService,
    *,
    footer_key: str,
    column_keys: Mapping[str, str],
) -> EncryptedFile:
    """Check one staged file (an open descriptor, left open); see the module docstring.

    Args:
        fd: the file, opened safely by the caller.
        shown: its path for messages.
        service: the job's key service.
        footer_key: the master key id that must protect the footer and unlisted columns.
        column_keys: top-level column -> master key id, for columns with their own key.

    Raises:
        EncryptedFileError: the file fails a check.
        KeyServiceError: a key could not be unwrapped.
    """
    used: list[KeyUse] = []
    errors: list[Exception] = []
    with os.fdopen(os.dup(fd), "rb") as handle:
        sha256 = _digest_and_magic(handle, shown)
        try:
            meta = pq.ParquetFile(
                handle, decryption_properties=_properties(service, used, errors)
            ).metadata
        except Exception as exc:
            raise _failure(shown, exc, errors) from None
        if not used:
            raise EncryptedFileError(
                f"`{shown}`: the footer was read without a key", path=shown, check="not-encrypted"
            )
        footer = used[0]
        if footer.key_id != footer_key:
            raise EncryptedFileError(
                f"`{shown}`: the footer is protected by master key `{footer.key_id}`, not by "
                f"`{footer_key}` as the job says",
                path=shown,
                check="key-mismatch",
            )
        arrow_schema = meta.schema.to_arrow_schema()
        top = {}
        for index in range(meta.num_columns):
            path = meta.schema.column(index).path
            top[index] = next(
                (n for n in arrow_schema.names if path == n or path.startswith(n + ".")), path
            )
        columns: dict[str, KeyUse] = {}
        for group in range(meta.num_row_groups):
            row_group = meta.row_group(group)
            for index in range(meta.num_columns):
                before = len(used)
                try:
                    row_group.column(index)
                except Exception as exc:
                    raise _failure(shown, exc, errors) from None
                name = top[index]
                if len(used) == before:
                    raise EncryptedFileError(
                        f"`{shown}`: column `{name}` is not encrypted; refusing to publish it",
                        path=shown,
                        check="plaintext-column",
                    )
                key = used[-1]
                expected = column_keys.get(name, footer_key)
                if key.key_id != expected:
                    raise EncryptedFileError(
                        f"`{shown}`: column `{name}` is protected by master key `{key.key_id}`, "
                        f"not by `{expected}` as the job says",
                        path=shown,
                        check="key-mismatch",
                    )
                columns[name] = key
    return EncryptedFile(rows=meta.num_rows, sha256=sha256, footer=footer, columns=columns)


def read_encrypted(path: str, service: KeyService, *, columns: list[str] | None = None) -> pa.Table:
    """Read an encrypted Parquet file with the key service's keys.

    Raises:
        EncryptedFileError: `authentication failed: FILE was modified or the key is wrong`, or
            the file is not readable as encrypted Parquet.
        KeyServiceError: a master key is missing, revoked, wrong, or the service is down.
    """
    used: list[KeyUse] = []
    errors: list[Exception] = []
    try:
        reader = pq.ParquetFile(path, decryption_properties=_properties(service, used, errors))
        return reader.read(columns=columns)
    except Exception as exc:
        raise _failure(path, exc, errors) from None
