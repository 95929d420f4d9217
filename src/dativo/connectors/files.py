"""The `files` reader: CSV, JSON lines and Parquet files from the job's input directory.

Files are matched by glob patterns relative to `context.input_dir`, sorted by path and streamed
block by block (CSV and JSON lines) or batch by batch (Parquet), so memory stays bounded
whatever the file size: Arrow reads up to 32 blocks of `block_size` bytes (default 1 MiB) ahead,
so CSV and JSON lines need roughly 32 x `block_size` plus the parsed batches. Batches are
re-chunked to `batch_size` rows (small ones combined, large ones sliced; the last may be
shorter).

Schema: with a declared `schema` every file is read and cast to exactly that schema (CSV
columns not declared are skipped). Without one, the schema is inferred from the first
non-empty file (for CSV and JSON lines, from its first block; a column that is empty there is
read as string) and every other file is read with those types: a column missing, an extra
column or a value that does not convert is an error that names the file and column.

Incremental mode records `{"files": {path: {"size": n, "mtime_ns": n}}}` and skips, on the next
run, every file whose size and modification time are unchanged.
"""

from __future__ import annotations

import csv
import io
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dativo.config import parse_size
from dativo.connectors import parse_plugin_config
from dativo.sdk import DataReader, PluginConfigError, PluginContext, SourceError

__all__ = [
    "TYPE_HINT",
    "FileReader",
    "FileReaderConfig",
    "check_schema_mapping",
    "parse_arrow_type",
]

Format = Literal["csv", "jsonl", "parquet"]

_EXTENSIONS: dict[str, Format] = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
# Compression suffixes Arrow decompresses transparently (CSV and JSON lines only).
_COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")
_GLOB_CHARS = frozenset("*?[")

# ---------------------------------------------------------------------------------------------
# Type strings


TYPE_HINT = (
    "int8, int16, int32, int64, uint8, uint16, uint32, uint64, float32, float64, string, "
    "large_string, binary, bool, date32, date64, timestamp[s|ms|us|ns] (optionally with a time "
    "zone: `timestamp[us, UTC]`), time32[s|ms], time64[us|ns], duration[s|ms|us|ns], "
    "decimal128(precision,scale)"
)

_SIMPLE_TYPES: dict[str, pa.DataType] = {
    "bool": pa.bool_(),
    "boolean": pa.bool_(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "uint8": pa.uint8(),
    "uint16": pa.uint16(),
    "uint32": pa.uint32(),
    "uint64": pa.uint64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "double": pa.float64(),
    "string": pa.string(),
    "utf8": pa.string(),
    "large_string": pa.large_string(),
    "binary": pa.binary(),
    "large_binary": pa.large_binary(),
    "date32": pa.date32(),
    "date64": pa.date64(),
}
_UNIT_RE = re.compile(
    r"(timestamp|time32|time64|duration)\[\s*(s|ms|us|ns)\s*(?:,\s*([^\]]*?)\s*)?\]"
)
_DECIMAL_RE = re.compile(r"decimal(128|256)?\(\s*(\d+)\s*,\s*(\d+)\s*\)")
_TZ_RE = re.compile(r"[A-Za-z0-9_/+\-:]+")


def parse_arrow_type(text: str) -> pa.DataType:
    """Parse a type string such as `int64`, `timestamp[us, UTC]` or `decimal128(18,2)`.

    Raises:
        ValueError: the string is not a supported type; the message lists the valid ones.
    """
    spec = text.strip()
    simple = _SIMPLE_TYPES.get(spec.lower())
    if simple is not None:
        return simple
    bad = ValueError(f"unknown type `{text}`; valid types are {TYPE_HINT}")
    match = _UNIT_RE.fullmatch(spec)
    if match is not None:
        kind, unit, tz = match.groups()
        try:
            if kind == "timestamp":
                if tz is not None and not _TZ_RE.fullmatch(tz):
                    raise bad
                return pa.timestamp(unit, tz=tz)
            if tz is not None:
                raise bad
            if kind == "time32":
                return pa.time32(unit)
            if kind == "time64":
                return pa.time64(unit)
            return pa.duration(unit)
        except (ValueError, pa.ArrowInvalid) as exc:
            raise bad from exc
    match = _DECIMAL_RE.fullmatch(spec)
    if match is not None:
        width, precision, scale = match.group(1), int(match.group(2)), int(match.group(3))
        if scale > precision:
            raise ValueError(f"`{text}`: the scale ({scale}) cannot exceed the precision")
        if width == "256" or (width is None and precision > 38):
            if not 1 <= precision <= 76:
                raise ValueError(f"`{text}`: decimal256 precision must be 1..76")
            return pa.decimal256(precision, scale)
        if not 1 <= precision <= 38:
            raise ValueError(f"`{text}`: decimal128 precision must be 1..38")
        return pa.decimal128(precision, scale)
    raise bad


def check_schema_mapping(value: dict[str, str] | None) -> dict[str, str] | None:
    """Validate a declared `schema:` mapping (column -> type string) of a reader's config.

    Raises:
        ValueError: empty, an empty column name, or a type string `parse_arrow_type` refuses.
    """
    if value is None:
        return None
    if not value:
        raise ValueError("must name at least one column, or be left out to infer it")
    for column, type_text in value.items():
        if not column:
            raise ValueError("column names cannot be empty")
        try:
            parse_arrow_type(type_text)
        except ValueError as exc:
            raise ValueError(f"column `{column}`: {exc}") from None
    return value


# ---------------------------------------------------------------------------------------------
# Config


class CsvOptions(BaseModel):
    """How CSV files are parsed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    delimiter: str = Field(default=",", description="one character separating fields")
    header: bool = Field(default=True, description="the first line holds the column names")
    null_values: list[str] = Field(
        default_factory=lambda: [""],
        description="unquoted field values read as null (default: only the empty field)",
    )
    quote_char: str | None = Field(default='"', description="quote character; null: none")
    newlines_in_values: bool = Field(
        default=False, description="quoted values may contain line breaks (slower)"
    )

    @field_validator("delimiter")
    @classmethod
    def _one_char(cls, value: str) -> str:
        if len(value) != 1 or value in "\r\n":
            raise ValueError("must be exactly one character other than a line break, e.g. `;`")
        return value

    @field_validator("quote_char")
    @classmethod
    def _quote(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if len(value) != 1 or value in "\r\n":
            raise ValueError('must be one character (usually `"`) or null for no quoting')
        return value


class FileReaderConfig(BaseModel):
    """Config of the `files` reader."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    paths: list[str] = Field(
        min_length=1, description="glob patterns relative to the input directory"
    )
    format: Format | None = Field(default=None, description="default: from the extension")
    schema_: dict[str, str] | None = Field(
        default=None, alias="schema", description="column -> type; default: inferred"
    )
    csv: CsvOptions = Field(default_factory=CsvOptions)
    incremental: bool = Field(default=False, description="skip files read by earlier runs")
    block_size: int = Field(
        default=1 << 20,
        description="bytes parsed at a time for CSV and JSON lines (longest line must fit)",
    )

    @field_validator("paths", mode="before")
    @classmethod
    def _one_path(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("paths")
    @classmethod
    def _relative(cls, value: list[str]) -> list[str]:
        return [_normalise_pattern(p) for p in value]

    @field_validator("schema_")
    @classmethod
    def _types(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return check_schema_mapping(value)

    @field_validator("block_size", mode="before")
    @classmethod
    def _size(cls, value: object) -> int:
        size = parse_size(value)
        if not 4096 <= size <= 1 << 30:
            raise ValueError("must be between 4KiB and 1GiB, e.g. `4MiB`")
        return size


def _normalise_pattern(pattern: str) -> str:
    text = pattern.strip()
    if not text:
        raise ValueError("a pattern cannot be empty; write e.g. `orders/*.csv`")
    if "\\" in text:
        raise ValueError(f"`{pattern}`: separate directories with `/`, not `\\`")
    if text.startswith("/") or re.match(r"[A-Za-z]:", text):
        raise ValueError(
            f"`{pattern}` is absolute; patterns are relative to the input directory "
            "(write `orders/*.csv`, not `/data/in/orders/*.csv`)"
        )
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(
            f"`{pattern}` contains `..`; patterns cannot reach outside the input directory"
        )
    if not parts:
        raise ValueError(f"`{pattern}` names no file; write e.g. `*.csv` or `**/*.parquet`")
    return "/".join(parts)


# ---------------------------------------------------------------------------------------------
# Matching


def _segment_regex(segment: str) -> str:
    out = [] if segment.startswith(".") else [r"(?!\.)"]
    i = 0
    while i < len(segment):
        char = segment[i]
        if char == "*":
            while i + 1 < len(segment) and segment[i + 1] == "*":
                i += 1
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            j = i + 1
            if j < len(segment) and segment[j] == "!":
                j += 1
            if j < len(segment) and segment[j] == "]":
                j += 1
            while j < len(segment) and segment[j] != "]":
                j += 1
            if j >= len(segment):
                out.append(re.escape(char))
            else:
                body = segment[i + 1 : j].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^/" + body[1:]
                elif body.startswith(("^", "[")):
                    body = "\\" + body
                out.append(f"[{body}]")
                i = j
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


def _pattern_regex(parts: list[str]) -> re.Pattern[str]:
    regex = ""
    for k, segment in enumerate(parts):
        last = k == len(parts) - 1
        if segment == "**":
            regex += r"(?:(?!\.)[^/]+/)*(?!\.)[^/]+" if last else r"(?:(?!\.)[^/]+/)*"
        else:
            regex += _segment_regex(segment) + ("" if last else "/")
    return re.compile(regex)


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root + os.sep)


@dataclass(frozen=True)
class _Source:
    rel: str
    path: str
    size: int
    mtime_ns: int
    format: Format


def _match(root: str, pattern: str) -> list[tuple[str, str]]:
    """(relative path, real path) of every regular file matching `pattern` under `root`."""
    parts = pattern.split("/")
    prefix: list[str] = []
    for segment in parts:
        if _GLOB_CHARS.intersection(segment):
            break
        prefix.append(segment)
    candidates: list[tuple[str, str]] = []
    if len(prefix) == len(parts):
        candidates.append((pattern, os.path.join(root, *parts)))
        start_real = None
    else:
        start = os.path.join(root, *prefix)
        start_real = os.path.realpath(start)
        if not _inside(root, start_real):
            raise SourceError(
                f"pattern `{pattern}`: `{'/'.join(prefix)}` is a symbolic link to a place "
                "outside the input directory; refusing to follow it. Copy the files into the "
                "input directory instead."
            )
    if start_real is not None and os.path.isdir(start_real):
        regex = _pattern_regex(parts)
        rest = parts[len(prefix) :]
        max_depth = None if "**" in rest else len(rest) - 1
        for dirpath, dirnames, filenames in os.walk(start_real, followlinks=False):
            below = os.path.relpath(dirpath, start_real)
            sub = [] if below == "." else below.split(os.sep)
            if max_depth is not None and len(sub) >= max_depth:
                dirnames[:] = []
            for name in filenames:
                rel = "/".join([*prefix, *sub, name])
                if regex.fullmatch(rel):
                    candidates.append((rel, os.path.join(dirpath, name)))
    found: list[tuple[str, str]] = []
    for rel, path in candidates:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(info.st_mode) or start_real is None:
            real = os.path.realpath(path)
            if not _inside(root, real):
                raise SourceError(
                    f"`{rel}` is a symbolic link to a file outside the input directory; "
                    "refusing to read it. Copy the file into the input directory instead."
                )
            try:
                info = os.stat(real)
            except FileNotFoundError:
                continue
            path = real
        if stat.S_ISREG(info.st_mode):
            found.append((rel, path))
    return found


def _format_of(rel: str) -> Format | None:
    name = rel.lower()
    for suffix in _COMPRESSED:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return _EXTENSIONS.get(os.path.splitext(name)[1])


# ---------------------------------------------------------------------------------------------
# Schemas


def _plain_type(dtype: pa.DataType, *, null_as_string: bool) -> pa.DataType:
    """Decode dictionaries (protocol v1 forbids them); optionally read null columns as string."""
    if pa.types.is_dictionary(dtype):
        return _plain_type(dtype.value_type, null_as_string=null_as_string)
    if pa.types.is_null(dtype) and null_as_string:
        return pa.string()
    if pa.types.is_struct(dtype):
        return pa.struct([_plain_field(dtype.field(i), False) for i in range(dtype.num_fields)])
    if pa.types.is_large_list(dtype):
        return pa.large_list(_plain_field(dtype.value_field, False))
    if pa.types.is_fixed_size_list(dtype):
        return pa.list_(_plain_field(dtype.value_field, False), dtype.list_size)
    if pa.types.is_list(dtype):
        return pa.list_(_plain_field(dtype.value_field, False))
    if pa.types.is_map(dtype):
        return pa.map_(
            _plain_type(dtype.key_type, null_as_string=False),
            _plain_field(dtype.item_field, False),
        )
    return dtype


def _plain_field(field: pa.Field, null_as_string: bool) -> pa.Field:
    return pa.field(field.name, _plain_type(field.type, null_as_string=null_as_string))


def _plain_schema(schema: pa.Schema, *, null_as_string: bool) -> pa.Schema:
    return pa.schema([_plain_field(f, null_as_string) for f in schema])


def _castable(src: pa.DataType, dst: pa.DataType) -> bool:
    """Whether a later file's column may be cast (value-checked) to the inferred type."""
    t = pa.types
    if src == dst or t.is_null(src):
        return True

    def both(test: Any) -> bool:
        return bool(test(src) and test(dst))

    if both(t.is_integer) or both(t.is_date) or both(t.is_decimal):
        return True
    if both(lambda x: t.is_string(x) or t.is_large_string(x)):
        return True
    if both(lambda x: t.is_binary(x) or t.is_large_binary(x)):
        return True
    if t.is_floating(dst) and t.is_integer(src):
        return True
    if both(t.is_floating):
        return bool(src.bit_width <= dst.bit_width)
    if t.is_decimal(dst) and t.is_integer(src):
        return True
    return bool(both(t.is_timestamp) and src.tz == dst.tz)


def _conform(batch: pa.RecordBatch, schema: pa.Schema, rel: str) -> pa.RecordBatch:
    """Select, order and cast the columns of `batch` to `schema`."""
    if batch.schema.equals(schema, check_metadata=False):
        return pa.RecordBatch.from_arrays(batch.columns, schema=schema)
    arrays = []
    for field in schema:
        index = batch.schema.get_field_index(field.name)
        if index < 0:
            raise SourceError(f"{rel}: column `{field.name}` is missing")
        column = batch.column(index)
        if column.type != field.type:
            try:
                column = pc.cast(column, field.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise SourceError(
                    f"{rel}: column `{field.name}` cannot be read as {field.type} "
                    f"(the file has {column.type}): {exc}. Fix the data, or declare another "
                    "type for it under `schema`."
                ) from None
        arrays.append(column)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


# ---------------------------------------------------------------------------------------------
# Re-chunking


class _Rechunker:
    """Turns a stream of batches of any size into batches of `size` rows (the last may be less)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._parts: list[pa.RecordBatch] = []
        self._rows = 0

    def push(self, batch: pa.RecordBatch) -> Iterator[pa.RecordBatch]:
        while batch.num_rows:
            need = self.size - self._rows
            if batch.num_rows < need:
                self._parts.append(batch)
                self._rows += batch.num_rows
                return
            self._parts.append(batch.slice(0, need))
            batch = batch.slice(need)
            yield self._take()

    def flush(self) -> Iterator[pa.RecordBatch]:
        if self._rows:
            yield self._take()

    def _take(self) -> pa.RecordBatch:
        parts, self._parts, self._rows = self._parts, [], 0
        return parts[0] if len(parts) == 1 else pa.concat_batches(parts)


# ---------------------------------------------------------------------------------------------
# The reader

_CSV_COLUMN_RE = re.compile(r"In CSV column #(\d+): (.*)", re.DOTALL)
_NULL_WORD_RE = re.compile(r"invalid value '(null|none|nil|na|n/a|nan|\\n|-|\?)'", re.IGNORECASE)
_JSON_COLUMN_RE = re.compile(r"Column\(/([^)/]*)\)")


class FileReader(DataReader):
    """Reads CSV, JSON lines and Parquet files; see the module docstring."""

    name = "files"
    version = "0.1.0"

    def __init__(self) -> None:
        self._config: FileReaderConfig | None = None
        self._context: PluginContext | None = None
        self._root = ""
        self._matched: list[_Source] = []
        self._todo: list[_Source] = []
        self._declared: pa.Schema | None = None
        self._schema: pa.Schema | None = None
        self._state: dict[str, dict[str, int]] = {}
        self._done: dict[str, dict[str, int]] = {}

    # -- lifecycle ----------------------------------------------------------------------------

    def initialize(self, config: dict[str, Any], context: PluginContext) -> None:
        cfg = parse_plugin_config(FileReaderConfig, config, "reader `files`")
        self._config = cfg
        self._context = context
        if context.input_dir is None:
            raise PluginConfigError(
                "reader `files`: this job grants no input directory; give the job an input "
                "directory (it is mounted read-only at /data/in) holding the files to read"
            )
        root = os.path.realpath(context.input_dir)
        if not os.path.isdir(root):
            raise SourceError(f"the input directory {context.input_dir} does not exist")
        self._root = root
        if cfg.schema_ is not None:
            self._declared = pa.schema(
                [pa.field(n, parse_arrow_type(t)) for n, t in cfg.schema_.items()]
            )
        self._matched = self._find_files(cfg)
        self._state = self._prior_state(context.state) if cfg.incremental else {}
        self._todo = [s for s in self._matched if self._changed(s)]
        context.log.info("matched %d file(s); %d to read", len(self._matched), len(self._todo))

    def get_schema(self) -> pa.Schema:
        if self._schema is None:
            self._schema = self._declared if self._declared is not None else self._infer()
        return self._schema

    def read_batch(self, batch_size: int) -> Iterator[pa.RecordBatch]:
        schema = self.get_schema()
        chunker = _Rechunker(max(1, batch_size))
        read = emitted = 0
        pending: list[tuple[int, _Source]] = []  # (rows read when the file ended, file)
        for source in self._todo:
            for batch in self._iter_file(source, schema, max(1, batch_size)):
                read += batch.num_rows
                for out in chunker.push(batch):
                    yield out
                    emitted += out.num_rows
                    self._checkpoint(pending, emitted)
            self._done[source.rel] = {"size": source.size, "mtime_ns": source.mtime_ns}
            pending.append((read, source))
            self._checkpoint(pending, emitted)
        for out in chunker.flush():
            yield out
            emitted += out.num_rows
        self._checkpoint(pending, emitted)

    def get_incremental_state(self) -> dict[str, Any] | None:
        if not self._cfg().incremental:
            return None
        return {"files": {**self._state, **self._done}}

    # -- helpers ------------------------------------------------------------------------------

    def _cfg(self) -> FileReaderConfig:
        if self._config is None:
            raise RuntimeError("initialize() was not called")
        return self._config

    def _checkpoint(self, pending: list[tuple[int, _Source]], emitted: int) -> None:
        if not self._cfg().incremental or not pending or pending[0][0] > emitted:
            return
        while pending and pending[0][0] <= emitted:
            pending.pop(0)
        done = {k: v for k, v in self._done.items() if all(s.rel != k for _, s in pending)}
        assert self._context is not None
        self._context.checkpoint({"files": {**self._state, **done}})

    def _find_files(self, cfg: FileReaderConfig) -> list[_Source]:
        found: dict[str, str] = {}
        for pattern in cfg.paths:
            matches = _match(self._root, pattern)
            if not matches:
                raise SourceError(
                    f"pattern `{pattern}` matched no file in the input directory; check the "
                    "pattern (relative to the input directory, `**` for any subdirectory; "
                    "names starting with `.` are matched only by a pattern starting with `.`) "
                    "and that the files exist"
                )
            for rel, path in matches:
                found.setdefault(rel, path)
        sources: list[_Source] = []
        unknown: list[str] = []
        for rel in sorted(found):
            fmt = cfg.format or _format_of(rel)
            if fmt is None:
                unknown.append(rel)
                continue
            info = os.stat(found[rel])
            sources.append(_Source(rel, found[rel], info.st_size, info.st_mtime_ns, fmt))
        if unknown:
            raise PluginConfigError(
                f"reader `files`: cannot tell the format of {_few(unknown)} from the extension "
                "(known: .csv, .jsonl, .ndjson, .json, .parquet, .pq, optionally compressed "
                "with .gz/.bz2/.zst/.lz4); set `format: csv`, `jsonl` or `parquet`, or narrow "
                "`paths`"
            )
        formats = sorted({s.format for s in sources})
        if len(formats) > 1:
            detail = "; ".join(
                f"{f}: {_few([s.rel for s in sources if s.format == f])}" for f in formats
            )
            raise PluginConfigError(
                f"reader `files`: `paths` match files of several formats ({detail}); one job "
                "reads one format: narrow `paths` or use one job per format"
            )
        return sources

    @staticmethod
    def _prior_state(state: dict[str, Any] | None) -> dict[str, dict[str, int]]:
        if not state:
            return {}
        files = state.get("files")
        ok = isinstance(files, dict) and all(
            isinstance(k, str)
            and isinstance(v, dict)
            and isinstance(v.get("size"), int)
            and isinstance(v.get("mtime_ns"), int)
            for k, v in files.items()
        )
        if not ok:
            raise SourceError(
                "the saved incremental state of this job is not of the form "
                '{"files": {path: {"size": n, "mtime_ns": n}}}; reset the job\'s state to '
                "read every file again"
            )
        assert isinstance(files, dict)
        return {k: {"size": v["size"], "mtime_ns": v["mtime_ns"]} for k, v in files.items()}

    def _changed(self, source: _Source) -> bool:
        old = self._state.get(source.rel)
        return old is None or old != {"size": source.size, "mtime_ns": source.mtime_ns}

    def _infer(self) -> pa.Schema:
        first = next((s for s in self._matched if s.size > 0), None)
        if first is None:
            raise SourceError(
                f"every matched file is empty ({_few([s.rel for s in self._matched])}); "
                "there is nothing to infer a schema from: declare `schema`"
            )
        try:
            if first.format == "parquet":
                with pq.ParquetFile(first.path) as pf:
                    return _plain_schema(pf.schema_arrow, null_as_string=False)
            if first.format == "csv":
                header = self._csv_names(first)
                with self._open_csv(first, header, None) as reader:
                    return _plain_schema(reader.schema, null_as_string=True)
            with self._open_json(first, None) as reader:
                return _plain_schema(reader.schema, null_as_string=True)
        except SourceError:
            raise
        except (pa.ArrowException, OSError) as exc:
            raise SourceError(f"{first.rel}: cannot read it to infer the schema: {exc}") from None

    def _iter_file(
        self, source: _Source, schema: pa.Schema, batch_size: int
    ) -> Iterator[pa.RecordBatch]:
        if source.size == 0:
            return
        try:
            if source.format == "parquet":
                yield from self._iter_parquet(source, schema, batch_size)
            elif source.format == "csv":
                yield from self._iter_csv(source, schema)
            else:
                yield from self._iter_json(source, schema)
        except SourceError:
            raise
        except pa.ArrowInvalid as exc:
            raise SourceError(f"{source.rel}: {exc}") from None
        except (pa.ArrowException, OSError) as exc:
            raise SourceError(f"{source.rel}: cannot read it: {exc}") from None

    # Parquet

    def _iter_parquet(
        self, source: _Source, schema: pa.Schema, batch_size: int
    ) -> Iterator[pa.RecordBatch]:
        with pq.ParquetFile(source.path) as pf:
            have = _plain_schema(pf.schema_arrow, null_as_string=False)
            missing = [n for n in schema.names if have.get_field_index(n) < 0]
            if missing:
                raise SourceError(
                    f"{source.rel}: column(s) {_names(missing)} missing; the file has "
                    f"{_names(have.names)}" + self._fix()
                )
            if self._declared is None:
                extra = [n for n in have.names if schema.get_field_index(n) < 0]
                bad = [
                    f"`{f.name}` is {f.type} here but {schema.field(f.name).type} in the first file"
                    for f in have
                    if f.name not in extra and not _castable(f.type, schema.field(f.name).type)
                ]
                if extra or bad:
                    why = [f"extra column(s) {_names(extra)}"] if extra else []
                    raise SourceError(
                        f"{source.rel}: does not match the schema inferred from the first "
                        f"file: {'; '.join(why + bad)}" + self._fix()
                    )
            for batch in pf.iter_batches(batch_size=batch_size, columns=schema.names):
                yield _conform(batch, schema, source.rel)

    # CSV

    def _csv_names(self, source: _Source) -> list[str]:
        """The column names of a CSV file: its header, or the schema's when it has none."""
        opts = self._cfg().csv
        if not opts.header:
            return []
        with pa.input_stream(source.path, compression="detect") as stream:
            head = stream.read(min(self._cfg().block_size, 1 << 20))
        text = head.decode("utf-8", errors="replace").removeprefix("\ufeff")
        reader = csv.reader(
            io.StringIO(text, newline=""),
            delimiter=opts.delimiter,
            quotechar=opts.quote_char,
            quoting=csv.QUOTE_MINIMAL if opts.quote_char else csv.QUOTE_NONE,
        )
        return next(reader, [])

    def _open_csv(
        self, source: _Source, header: list[str], schema: pa.Schema | None
    ) -> pacsv.CSVStreamingReader:
        cfg = self._cfg()
        opts = cfg.csv
        column_names: list[str] | None = None
        if not opts.header and schema is not None:
            column_names = schema.names
        read = pacsv.ReadOptions(
            block_size=cfg.block_size,
            column_names=column_names,
            autogenerate_column_names=not opts.header and column_names is None,
        )
        parse = pacsv.ParseOptions(
            delimiter=opts.delimiter,
            quote_char=opts.quote_char or False,
            newlines_in_values=opts.newlines_in_values,
        )
        convert = pacsv.ConvertOptions(
            column_types=None if schema is None else {f.name: f.type for f in schema},
            include_columns=None if schema is None else schema.names,
            null_values=opts.null_values,
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        )
        stream = pa.input_stream(source.path, compression="detect")
        try:
            return pacsv.open_csv(
                stream, read_options=read, parse_options=parse, convert_options=convert
            )
        except pa.ArrowInvalid as exc:
            stream.close()
            raise SourceError(self._csv_error(source, header, schema, exc)) from None
        except BaseException:
            stream.close()
            raise

    def _iter_csv(self, source: _Source, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
        opts = self._cfg().csv
        header = self._csv_names(source)
        if opts.header:
            missing = [n for n in schema.names if n not in header]
            if missing:
                raise SourceError(
                    f"{source.rel}: column(s) {_names(missing)} missing; the header has "
                    f"{_names(header)}" + self._fix()
                )
            dups = sorted({n for n in schema.names if header.count(n) > 1})
            if dups:
                raise SourceError(f"{source.rel}: the header repeats column(s) {_names(dups)}")
            if self._declared is None:
                extra = [n for n in header if n not in schema.names]
                if extra:
                    raise SourceError(
                        f"{source.rel}: extra column(s) {_names(extra)} not in the first file"
                        + self._fix()
                    )
        with self._open_csv(source, header, schema) as reader:
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                except pa.ArrowInvalid as exc:
                    raise SourceError(self._csv_error(source, header, schema, exc)) from None
                yield _conform(batch, schema, source.rel)

    def _csv_error(
        self, source: _Source, header: list[str], schema: pa.Schema | None, exc: Exception
    ) -> str:
        text = str(exc)
        names = header or (schema.names if schema is not None else [])
        match = _CSV_COLUMN_RE.match(text)
        if match is not None:
            index, detail = int(match.group(1)), match.group(2)
            column = names[index] if index < len(names) else f"#{index + 1}"
            wanted = schema.field(column).type if schema and column in schema.names else None
            return (
                f"{source.rel}: column `{column}`"
                + (f" cannot be read as {wanted}" if wanted is not None else "")
                + f": {detail}."
                + (self._fix() if self._declared is None else " Fix the data or its `schema` type.")
                + (
                    " If that value means null, list it in `csv.null_values`."
                    if _NULL_WORD_RE.search(detail)
                    else ""
                )
            )
        hint = ""
        if "Expected" in text and "columns" in text:
            hint = (
                " Check `csv.delimiter` and `csv.quote_char`; set `csv.newlines_in_values: "
                "true` if quoted values contain line breaks."
            )
        elif "straddling" in text or "block" in text:
            hint = " A line is longer than `block_size`: raise it."
        return f"{source.rel}: {text}.{hint}"

    # JSON lines

    def _open_json(self, source: _Source, schema: pa.Schema | None) -> pajson.JSONStreamingReader:
        read = pajson.ReadOptions(block_size=self._cfg().block_size)
        if schema is None:
            parse = pajson.ParseOptions(newlines_in_values=False)
        else:
            parse = pajson.ParseOptions(
                explicit_schema=pa.schema(
                    [pa.field(f.name, _json_read_type(f.type)) for f in schema]
                ),
                unexpected_field_behavior="ignore" if self._declared is not None else "error",
            )
        stream = pa.input_stream(source.path, compression="detect")
        try:
            return pajson.open_json(stream, read_options=read, parse_options=parse)
        except BaseException:
            stream.close()
            raise

    def _iter_json(self, source: _Source, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
        try:
            reader = self._open_json(source, schema)
        except pa.ArrowInvalid as exc:
            raise SourceError(self._json_error(source, schema, exc)) from None
        with reader:
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                except pa.ArrowInvalid as exc:
                    raise SourceError(self._json_error(source, schema, exc)) from None
                yield _conform(batch, schema, source.rel)

    def _json_error(self, source: _Source, schema: pa.Schema, exc: Exception) -> str:
        text = str(exc)
        if "unexpected field" in text.lower():
            return (
                f"{source.rel}: {text}: a line has a field that is not in the schema inferred "
                "from the first file." + self._fix()
            )
        if "straddl" in text:
            return f"{source.rel}: {text}: a line is longer than `block_size`; raise it."
        match = _JSON_COLUMN_RE.search(text)
        if match is not None and match.group(1) in schema.names:
            column = match.group(1)
            text = f"column `{column}` cannot be read as {schema.field(column).type}: {text}"
        return f"{source.rel}: {text}." + (
            self._fix() if self._declared is None else " Fix the data or its `schema` type."
        )

    def _fix(self) -> str:
        if self._declared is not None:
            return " Fix the file, or the `schema` of the job."
        return (
            " Without `schema`, the schema is inferred from the first file and every file "
            "must match it: declare `schema` (column -> type) to read them all alike."
        )


def _json_read_type(dtype: pa.DataType) -> pa.DataType:
    """JSON cannot parse dates and times directly: read them as strings, then cast."""
    if pa.types.is_date(dtype) or pa.types.is_time(dtype):
        return pa.string()
    return dtype


def _names(names: list[str]) -> str:
    return ", ".join(f"`{n}`" for n in names[:20]) + (" ..." if len(names) > 20 else "")


def _few(items: list[str]) -> str:
    return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
