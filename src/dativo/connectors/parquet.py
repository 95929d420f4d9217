"""The `parquet` writer: Parquet files in the staging directory, optionally hive-partitioned.

Files are named `{file_prefix}-{run_id}-{seq:05d}.parquet` (one sequence for the whole
run) and written under a hidden temporary name (`.{name}.tmp`) in their final directory, then
renamed when closed; a crash leaves only `.tmp` names behind. A file is closed and a new one
started once it reaches `target_file_size`.

Rows are buffered per partition until `row_group_size` rows (or a memory budget) are reached,
then written as one row group, so memory stays bounded. With `partition_by`, rows go to
`col=value/` directories: names and values are percent-encoded to be path-safe, a null is
`__null__`, an empty string `__empty__`, and a value longer than 200 bytes is shortened and
suffixed with a hash. As is usual for hive layouts, the partition columns are not stored in the
files themselves: readers such as `pyarrow.dataset(..., partitioning="hive")` restore them from
the directory names.

Every file and directory is created relative to an open directory descriptor, with
`O_NOFOLLOW` and `O_EXCL`, so a symbolic link planted in the staging directory is never
followed.

With an `encryption` section (filled in by the supervisor from `target.encryption`, never
written by hand), every file is written with Parquet modular encryption: AES-GCM
(`AES_GCM_V1`), an encrypted footer, and a fresh 256-bit data key per column and for the
footer in every file. Every column is encrypted: those listed in `column_keys` under their own
master key, all others under the footer key. The data keys are wrapped by the supervisor's key
broker (a Unix socket; this writer can wrap, never unwrap) and stored in the file's key
metadata; pyarrow encrypts pages in memory, so only ciphertext reaches the staging directory.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pqe
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dativo.config import parse_size
from dativo.connectors import parse_plugin_config
from dativo.protocol.keys import BrokerError, wrap_key
from dativo.sdk import (
    DataWriter,
    OutputFile,
    PluginConfigError,
    PluginContext,
    SourceError,
    WriteResult,
)

__all__ = ["ALGORITHM", "EncryptionSettings", "ParquetWriter", "ParquetWriterConfig"]

NULL_PARTITION = "__null__"
EMPTY_PARTITION = "__empty__"
_PER_PARTITION_BUFFER = 64 << 20  # bytes of Arrow data buffered for one row group at most
_TOTAL_BUFFER = 128 << 20  # bytes buffered over all partitions at most
_MAX_SEGMENT = 200  # bytes of one encoded partition value, before it is shortened
_SAFE_COLUMN_START = re.compile(r"[A-Za-z0-9_]")
_PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class EncryptionSettings(BaseModel):
    """What the supervisor tells the writer to encrypt with (from `target.encryption`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    socket: str = Field(description="the key broker's Unix socket")
    footer_key: str
    column_keys: dict[str, list[str]] = Field(default_factory=dict)


ALGORITHM = "AES_GCM_V1"


class _BrokerKmsClient(pqe.KmsClient):  # type: ignore[misc]
    """pyarrow's KMS client interface, served by the supervisor's key broker (wrap only)."""

    def __init__(self, socket_path: str, errors: list[str]) -> None:
        super().__init__()
        self._socket = socket_path
        self._errors = errors

    def wrap_key(self, key_bytes: bytes, master_key_identifier: str) -> str:
        try:
            return wrap_key(self._socket, master_key_identifier, bytes(key_bytes))
        except BrokerError as exc:
            self._errors.append(str(exc))
            raise

    def unwrap_key(self, wrapped_key: str, master_key_identifier: str) -> bytes:
        raise BrokerError("the writer cannot unwrap keys")


def _leaf_paths(column: pa.Field) -> list[str]:
    """The Parquet column paths (`a`, `s.x`, `l.list.element`) one Arrow column is stored as."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({column.name: pa.array([], type=column.type)}), sink)
    meta = pq.read_metadata(pa.BufferReader(sink.getvalue()))
    return [meta.schema.column(i).path for i in range(meta.num_columns)]


class ParquetWriterConfig(BaseModel):
    """Config of the `parquet` writer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    target_file_size: int = Field(
        default=128 << 20, description="start a new file once one reaches this size"
    )
    row_group_size: int = Field(default=1_000_000, ge=1, le=64 << 20)
    partition_by: list[str] = Field(default_factory=list)
    file_prefix: str = "part"
    max_open_partitions: int = Field(default=256, ge=1, le=4096)
    encryption: EncryptionSettings | None = None

    @field_validator("target_file_size", mode="before")
    @classmethod
    def _size(cls, value: object) -> int:
        size = parse_size(value)
        if size < 1024:
            raise ValueError("must be at least 1KiB; write e.g. `128MiB` or `1GiB`")
        return size

    @field_validator("partition_by", mode="before")
    @classmethod
    def _one_column(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("partition_by")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("names a column twice; list each partition column once")
        if any(not name for name in value):
            raise ValueError("column names cannot be empty")
        return value

    @field_validator("file_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not _PREFIX_RE.fullmatch(value):
            raise ValueError(
                "must be 1-64 letters, digits, `_`, `-` or `.`, starting with a letter or "
                "digit, e.g. `part` or `orders`"
            )
        return value


def _encode(text: str) -> str:
    """Percent-encode all but letters, digits and `_.-` (the supervisor accepts `%`)."""
    return quote(text, safe="").replace("~", "%7E")


def _segment(column: str, value: str | None) -> str:
    """The path-safe directory name `column=value` of one partition value."""
    if value is None:
        text = NULL_PARTITION
    elif value == "":
        text = EMPTY_PARTITION
    else:
        text = _encode(value)
        if text.startswith("."):
            text = "%2E" + text[1:]
        if text in (NULL_PARTITION, EMPTY_PARTITION):
            text = "%5F" + text[1:]
        if len(text) > _MAX_SEGMENT:
            digest = hashlib.sha256(value.encode()).hexdigest()[:16]
            head = text[: _MAX_SEGMENT - 17]
            cut = head.rfind("%", len(head) - 2)
            text = f"{head[:cut] if cut >= 0 else head}-{digest}"
    return f"{_encode(column)}={text}"


@dataclass
class _File:
    name: str
    tmp: str
    handle: Any  # the Python file object the ParquetWriter writes to
    writer: pq.ParquetWriter
    rows: int = 0


@dataclass
class _Partition:
    rel_dir: str  # "" for the staging directory itself
    values: dict[str, str]
    dir_fd: int
    buffer: list[pa.RecordBatch] = field(default_factory=list)
    rows: int = 0
    nbytes: int = 0
    file: _File | None = None


class ParquetWriter(DataWriter):
    """Writes Parquet files into the staging directory; see the module docstring."""

    name = "parquet"
    version = "0.1.0"

    def __init__(self) -> None:
        self._config: ParquetWriterConfig | None = None
        self._context: PluginContext | None = None
        self._schema: pa.Schema | None = None
        self._file_schema: pa.Schema | None = None
        self._root_fd: int | None = None
        self._dir_fds: dict[str, int] = {}  # relative directory -> descriptor
        self._created_dirs: list[str] = []
        self._partitions: dict[tuple[str, ...], _Partition] = {}
        self._written: list[tuple[_Partition, str, int, int]] = []  # (part, name, rows, bytes)
        self._seq = 0
        self._buffered = 0
        self._run_tag = ""
        self._finished = False
        self._crypto: pqe.CryptoFactory | None = None
        self._crypto_config: pqe.EncryptionConfiguration | None = None
        self._broker_errors: list[str] = []

    # -- lifecycle ----------------------------------------------------------------------------

    def initialize(self, config: dict[str, Any], context: PluginContext) -> None:
        self._config = parse_plugin_config(ParquetWriterConfig, config, "writer `parquet`")
        self._context = context
        if context.output_dir is None:
            raise PluginConfigError(
                "writer `parquet`: this job grants no output directory; give the job a "
                "destination directory for the files"
            )
        try:
            self._root_fd = os.open(context.output_dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise SourceError(
                f"cannot open the staging directory {context.output_dir}: {exc.strerror}"
            ) from None
        self._dir_fds[""] = self._root_fd
        self._run_tag = re.sub(r"[^A-Za-z0-9_-]", "_", context.run_id) or "run"

    def open(self, schema: pa.Schema) -> None:
        cfg = self._cfg()
        missing = [c for c in cfg.partition_by if schema.get_field_index(c) < 0]
        if missing:
            raise PluginConfigError(
                f"writer `parquet`: `partition_by` names column(s) "
                f"{', '.join(f'`{c}`' for c in missing)} that the data does not have; the "
                f"columns are {', '.join(f'`{n}`' for n in schema.names)}. Fix `partition_by`."
            )
        for name in cfg.partition_by:
            if not _SAFE_COLUMN_START.match(_encode(name)):
                raise PluginConfigError(
                    f"writer `parquet`: cannot partition by `{name}`: a partition column's name "
                    "must start with a letter, a digit or `_` (it begins a directory name); "
                    "rename the column or choose another"
                )
            dtype = schema.field(name).type
            if pa.types.is_nested(dtype) or pa.types.is_binary(dtype):
                raise PluginConfigError(
                    f"writer `parquet`: cannot partition by `{name}` of type {dtype}; partition "
                    "by a string, number, boolean, date, timestamp or decimal column"
                )
        keep = [f for f in schema if f.name not in cfg.partition_by]
        if not keep:
            raise PluginConfigError(
                "writer `parquet`: `partition_by` lists every column; leave at least one "
                "column to store in the files"
            )
        self._schema = schema
        self._file_schema = pa.schema(keep)
        if cfg.encryption is not None:
            self._setup_encryption(cfg.encryption, self._file_schema)

    def _setup_encryption(self, settings: EncryptionSettings, schema: pa.Schema) -> None:
        if self._cfg().partition_by:
            raise PluginConfigError(
                "writer `parquet`: an encrypted target cannot be partitioned (partition values "
                "would be written in plain text in directory names); remove `partition_by`"
            )
        owner: dict[str, str] = {}
        for key_id, columns in settings.column_keys.items():
            for column in columns:
                owner[column] = key_id
        unknown = [c for c in owner if schema.get_field_index(c) < 0]
        if unknown:
            raise PluginConfigError(
                f"writer `parquet`: `target.encryption.column_keys` names column(s) "
                f"{', '.join(f'`{c}`' for c in unknown)} that the data does not have; the "
                f"columns are {', '.join(f'`{n}`' for n in schema.names)}. Fix "
                "`target.encryption.column_keys`."
            )
        # Every column is encrypted: listed ones under their own key, the rest under the
        # footer key (a column left out would be written in plain text).
        column_keys: dict[str, list[str]] = {}
        for column in schema:
            key_id = owner.get(column.name, settings.footer_key)
            column_keys.setdefault(key_id, []).extend(_leaf_paths(column))
        errors = self._broker_errors
        self._crypto = pqe.CryptoFactory(lambda _config: _BrokerKmsClient(settings.socket, errors))
        self._crypto_config = pqe.EncryptionConfiguration(
            footer_key=settings.footer_key,
            column_keys=column_keys,
            encryption_algorithm=ALGORITHM,
            plaintext_footer=False,
            # Single wrapping: each 256-bit data key is wrapped by the master key itself;
            # pyarrow's double wrapping would put a 128-bit key-encryption key in between.
            double_wrapping=False,
            internal_key_material=True,
            data_key_length_bits=256,
        )

    def _encryption_properties(self) -> Any:
        """Fresh data keys for one file, wrapped by the broker; None when not encrypting."""
        if self._crypto is None or self._crypto_config is None:
            return None
        self._broker_errors.clear()
        try:
            return self._crypto.file_encryption_properties(
                pqe.KmsConnectionConfig(), self._crypto_config
            )
        except Exception as exc:
            said = self._broker_errors[-1] if self._broker_errors else str(exc)
            raise SourceError(
                f"writer `parquet`: encrypting failed, nothing was written: {said}"
            ) from None

    def write_batch(self, batch: pa.RecordBatch) -> None:
        if self._schema is None:
            self.open(batch.schema)
        if batch.num_rows == 0:
            return
        try:
            for key, values, part in self._split(batch):
                self._append(key, values, part)
            while self._buffered > _TOTAL_BUFFER:
                largest = max(self._partitions.values(), key=lambda p: p.nbytes)
                self._flush(largest)
        except OSError as exc:
            raise self._os_error(exc) from None

    def finalize(self) -> WriteResult:
        cfg = self._cfg()
        try:
            for part in self._partitions.values():
                self._flush(part)
                self._close_file(part)
        except OSError as exc:
            raise self._os_error(exc) from None
        self._finished = True
        files = [
            OutputFile(
                path=f"{part.rel_dir}/{name}" if part.rel_dir else name,
                rows=rows,
                bytes=size,
                partition=dict(part.values),
            )
            for part, name, rows, size in self._written
        ]
        files.sort(key=lambda f: f.path)
        self._release()
        metadata: dict[str, Any] = {"format": "parquet", "compression": cfg.compression}
        if cfg.encryption is not None:
            metadata["encryption"] = {
                "algorithm": ALGORITHM,
                "footer_key": cfg.encryption.footer_key,
                "column_keys": cfg.encryption.column_keys,
            }
        return WriteResult(files=files, metadata=metadata)

    def abort(self) -> None:
        if self._finished:
            return
        self._finished = True
        for part in self._partitions.values():
            part.buffer.clear()
            if part.file is not None:
                current, part.file = part.file, None
                for close in (current.writer.close, current.handle.close):
                    with contextlib.suppress(Exception):  # best effort: the run failed
                        close()
                self._unlink(part, current.tmp)
        for part, name, _, _ in self._written:
            self._unlink(part, name)
        self._written.clear()
        for rel in reversed(self._created_dirs):
            parent, _, base = rel.rpartition("/")
            fd = self._dir_fds.get(parent)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.rmdir(base, dir_fd=fd)
        self._release()

    def close(self) -> None:
        if not self._finished:
            self.abort()
        self._release()

    # -- helpers ------------------------------------------------------------------------------

    def _cfg(self) -> ParquetWriterConfig:
        if self._config is None:
            raise RuntimeError("initialize() was not called")
        return self._config

    def _split(
        self, batch: pa.RecordBatch
    ) -> list[tuple[tuple[str, ...], dict[str, str], pa.RecordBatch]]:
        """The batch's rows grouped by partition: (key, values, rows without partition cols)."""
        cfg = self._cfg()
        assert self._file_schema is not None
        data = [batch.column(f.name) for f in self._file_schema]
        if not cfg.partition_by:
            return [((), {}, pa.RecordBatch.from_arrays(data, schema=self._file_schema))]
        key: pa.Array | None = None
        for name in cfg.partition_by:
            codes = pc.dictionary_encode(batch.column(name), null_encoding="encode")
            indices = pc.cast(codes.indices, pa.int64())
            if key is None:
                key = indices
            else:
                combined = pc.add(pc.multiply(key, len(codes.dictionary)), indices)
                key = pc.cast(pc.dictionary_encode(combined).indices, pa.int64())
        assert key is not None
        uniques = pc.unique(key)
        stored = pa.RecordBatch.from_arrays(data, schema=self._file_schema)
        groups = []
        for value in uniques:
            if len(uniques) == 1:
                rows, first = stored, batch.slice(0, 1)
            else:
                rows = stored.filter(pc.equal(key, value))
                first = batch.slice(pc.index(key, value).as_py(), 1)
            texts: list[str | None] = []
            for name in cfg.partition_by:
                column = first.column(name)
                texts.append(None if column.null_count else pc.cast(column, pa.string())[0].as_py())
            values = {
                n: NULL_PARTITION if t is None else t
                for n, t in zip(cfg.partition_by, texts, strict=True)
            }
            segments = tuple(_segment(n, t) for n, t in zip(cfg.partition_by, texts, strict=True))
            groups.append((segments, values, rows))
        return groups

    def _append(self, key: tuple[str, ...], values: dict[str, str], rows: pa.RecordBatch) -> None:
        cfg = self._cfg()
        part = self._partitions.get(key)
        if part is None:
            if len(self._partitions) >= cfg.max_open_partitions:
                raise SourceError(
                    f"writer `parquet`: the data has more than {cfg.max_open_partitions} "
                    f"distinct values of `partition_by` ({', '.join(cfg.partition_by)}); "
                    "partition by columns with fewer distinct values, or raise "
                    "`max_open_partitions`"
                )
            rel_dir = "/".join(key)
            part = _Partition(rel_dir=rel_dir, values=values, dir_fd=self._make_dirs(key))
            self._partitions[key] = part
        part.buffer.append(rows)
        part.rows += rows.num_rows
        part.nbytes += rows.nbytes
        self._buffered += rows.nbytes
        limit = min(_PER_PARTITION_BUFFER, cfg.target_file_size)
        if part.rows >= cfg.row_group_size or part.nbytes >= limit:
            self._flush(part)

    def _make_dirs(self, segments: tuple[str, ...]) -> int:
        rel = ""
        fd = self._dir_fds[""]
        for segment in segments:
            child = f"{rel}/{segment}" if rel else segment
            cached = self._dir_fds.get(child)
            if cached is None:
                try:
                    os.mkdir(segment, 0o755, dir_fd=fd)
                    self._created_dirs.append(child)
                except FileExistsError:
                    pass
                try:
                    cached = os.open(segment, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    raise SourceError(
                        f"cannot use the directory `{child}` in the staging directory "
                        f"({exc.strerror}); it is not a plain directory (a symbolic link?)"
                    ) from None
                self._dir_fds[child] = cached
            rel, fd = child, cached
        return fd

    def _flush(self, part: _Partition) -> None:
        if not part.rows:
            return
        cfg = self._cfg()
        table = pa.Table.from_batches(part.buffer, schema=self._file_schema)
        self._buffered -= part.nbytes
        part.buffer, part.rows, part.nbytes = [], 0, 0
        if part.file is None:
            part.file = self._new_file(part)
        part.file.writer.write_table(table, row_group_size=cfg.row_group_size)
        part.file.rows += table.num_rows
        if part.file.handle.tell() >= cfg.target_file_size:
            self._close_file(part)

    def _new_file(self, part: _Partition) -> _File:
        cfg = self._cfg()
        self._seq += 1
        name = f"{cfg.file_prefix}-{self._run_tag}-{self._seq:05d}.parquet"
        tmp = f".{name}.tmp"
        # Keys first: a key that cannot be wrapped leaves no file behind at all.
        encryption = self._encryption_properties()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o644, dir_fd=part.dir_fd)
        handle = os.fdopen(fd, "wb", buffering=1 << 20)
        try:
            writer = pq.ParquetWriter(
                handle,
                self._file_schema,
                compression=cfg.compression,
                write_statistics=True,
                encryption_properties=encryption,
            )
        except BaseException:
            handle.close()
            os.unlink(tmp, dir_fd=part.dir_fd)
            raise
        return _File(name=name, tmp=tmp, handle=handle, writer=writer)

    def _close_file(self, part: _Partition) -> None:
        current = part.file
        if current is None:
            return
        current.writer.close()
        current.handle.flush()
        os.fsync(current.handle.fileno())
        size = os.fstat(current.handle.fileno()).st_size
        current.handle.close()
        part.file = None
        try:
            os.lstat(current.name, dir_fd=part.dir_fd)
        except FileNotFoundError:
            pass
        else:
            raise SourceError(
                f"`{current.name}` already exists in the staging directory; refusing to replace it"
            )
        os.rename(current.tmp, current.name, src_dir_fd=part.dir_fd, dst_dir_fd=part.dir_fd)
        self._written.append((part, current.name, current.rows, size))

    def _unlink(self, part: _Partition, name: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=part.dir_fd)

    def _release(self) -> None:
        for fd in self._dir_fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._dir_fds.clear()
        self._root_fd = None

    def _os_error(self, exc: OSError) -> SourceError:
        hint = ""
        if exc.errno == errno.ENOSPC:
            hint = "; the staging area is full: give the job more space or write less"
        return SourceError(f"writing Parquet failed: {exc.strerror or exc}{hint}")
