"""The `postgres` reader: a table or a query, streamed from PostgreSQL as Arrow batches.

It implements the contract in docs/postgres.md (config keys, the SQL it issues, the Arrow type of
each PostgreSQL type, the errors), which the Rust reader in `plugin-images/rust-postgres/`
implements too; a test compares both readers' output type by type.

Data moves through ADBC's libpq driver: the driver runs `COPY (<select>) TO STDOUT (FORMAT
binary)` and decodes the stream into Arrow arrays in C++, batch by batch, so no row ever becomes
a Python object. This module only plans the SQL (one snapshot, incremental bounds, parallel
ranges), turns the driver's types into the documented ones (numeric -> decimal128 or string,
JSON and opaque extension types -> their storage, metadata dropped) and re-chunks batches to
`batch_size` rows.

Connection: the plugin has no network. The granted `host:port` reaches it either as a Unix
socket (libpq needs no TLS there: `sslmode: disable`) or through the plugin host's loopback TCP
relay, where libpq negotiates TLS end to end with the real host name.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dativo.connectors import parse_plugin_config
from dativo.sdk import DataReader, PluginConfigError, PluginContext, SourceError

__all__ = ["PostgresConfig", "PostgresReader", "arrow_type_for"]

_PLUGIN = "reader `postgres`"


class IncrementalConfig(BaseModel):
    """Read only rows whose cursor column is above the saved cursor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    column: str = Field(min_length=1, description="the cursor column")
    mode: Literal["exclusive", "inclusive"] = Field(
        default="exclusive", description="`>` (exclusive) or `>=` (inclusive) the saved cursor"
    )
    start: str | None = Field(
        default=None, description="cursor value for the first run, in PostgreSQL's text form"
    )


class ParallelConfig(BaseModel):
    """Read one table over several connections that share one snapshot."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workers: int = Field(default=1, ge=1, le=16, description="connections (1-16)")
    by: str = Field(
        default="ctid", min_length=1, description="`ctid` (page ranges) or an integer column"
    )


class PostgresConfig(BaseModel):
    """Config of the `postgres` reader (docs/postgres.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(min_length=1, description="database host, as granted in `network`")
    port: int = Field(default=5432, ge=1, le=65535, description="database port")
    database: str = Field(min_length=1, description="database name")
    user: str = Field(min_length=1, description="role to log in as")
    password: str | None = Field(default=None, description="password; write `${ENV_VAR}`")
    sslmode: Literal["disable", "prefer", "require"] = Field(
        default="prefer", description="TLS to the database, end to end"
    )
    connect_timeout: int = Field(default=10, ge=1, le=300, description="seconds")
    table: str | None = Field(default=None, description="`table` or `schema.table`")
    query: str | None = Field(default=None, description="a SELECT (or VALUES, WITH ...)")
    columns: list[str] | None = Field(
        default=None, min_length=1, description="columns of `table` to read, in this order"
    )
    incremental: IncrementalConfig | None = None
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    application_name: str = Field(default="dativo", description="shown in pg_stat_activity")

    @model_validator(mode="after")
    def _one_source(self) -> PostgresConfig:
        if (self.table is None) == (self.query is None):
            raise ValueError("give exactly one of `table` and `query`")
        if self.query is not None and not self.query.strip():
            raise ValueError("`query` is empty")
        if self.columns is not None and self.table is None:
            raise ValueError("`columns` goes with `table`; with `query`, select the columns there")
        if self.parallel.workers > 1 and self.table is None:
            raise ValueError("`parallel` reads a `table`; it cannot split a `query`")
        return self


# ---------------------------------------------------------------------------------------------
# SQL text


def quote_ident(name: str) -> str:
    """`name` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """`value` as an SQL string literal, as PostgreSQL's own `quote_literal` writes it: a value
    holding a backslash becomes an `E'...'` literal with the backslash doubled, which reads the
    same whatever `standard_conforming_strings` is set to."""
    if "\x00" in value:
        raise PluginConfigError(f"{_PLUGIN}: a cursor value cannot contain a NUL character")
    quoted = value.replace("'", "''")
    if "\\" in value:
        return " E'" + quoted.replace("\\", "\\\\") + "'"
    return "'" + quoted + "'"


def qualified_table(table: str) -> str:
    """`schema.table` (split at the first `.`) or `table`, each part quoted as given."""
    schema, dot, name = table.partition(".")
    return f"{quote_ident(schema)}.{quote_ident(name)}" if dot else quote_ident(table)


def source_sql(config: PostgresConfig, part: str | None = None) -> str:
    """The source `S` of docs/postgres.md: a parenthesised SELECT usable in `FROM S AS x`.

    `part` is a parallel worker's share of a table (a ctid or key range), tested on the table.
    """
    if config.query is not None:
        return f"({config.query.strip().rstrip(';')})"
    assert config.table is not None
    columns = "*" if config.columns is None else ", ".join(map(quote_ident, config.columns))
    where = f" WHERE {part}" if part else ""
    return f"(SELECT {columns} FROM {qualified_table(config.table)}{where})"


# ---------------------------------------------------------------------------------------------
# Types

_SCALARS: dict[str, pa.DataType] = {
    "bool": pa.bool_(),
    "int2": pa.int16(),
    "int4": pa.int32(),
    "int8": pa.int64(),
    "float4": pa.float32(),
    "float8": pa.float64(),
    "text": pa.string(),
    "varchar": pa.string(),
    "bpchar": pa.string(),
    "name": pa.string(),
    "bytea": pa.binary(),
    "date": pa.date32(),
    "time": pa.time64("us"),
    "timestamp": pa.timestamp("us"),
    "timestamptz": pa.timestamp("us", tz="UTC"),
    "uuid": pa.string(),
    "json": pa.string(),
    "jsonb": pa.string(),
}
# Cursor columns: types whose order is meaningful and whose text form round-trips.
_CURSOR_TYPES = frozenset(
    {"int2", "int4", "int8", "numeric", "text", "varchar", "date", "timestamp", "timestamptz"}
)
# PostgreSQL's own range: 4713 BC .. 5874897 AD. ADBC turns +-infinity into values far below it.
_MIN_DATE = -2_451_545 - 10_957  # days since 1970 of 4714-11-24 BC, minus slack
_MIN_TIMESTAMP_US = -211_813_488_000_000_000
_VARHDRSZ = 4


def numeric_type(typmod: int) -> pa.DataType:
    """decimal128(p,s) for a numeric(p,s) with p <= 38 and 0 <= s <= p, else string."""
    if typmod < _VARHDRSZ:
        return pa.string()
    precision = ((typmod - _VARHDRSZ) >> 16) & 0xFFFF
    scale = (typmod - _VARHDRSZ) & 0x7FF
    if scale & 0x400:  # PostgreSQL 15+: an 11-bit signed scale
        scale -= 0x800
    if 1 <= precision <= 38 and 0 <= scale <= precision:
        return pa.decimal128(precision, scale)
    return pa.string()


def arrow_type_for(typname: str, typmod: int) -> pa.DataType | None:
    """The documented Arrow type of a PostgreSQL type (`pg_type.typname`), or None."""
    if typname.startswith("_"):
        element = arrow_type_for(typname[1:], typmod)
        return None if element is None or typname[1:].startswith("_") else pa.list_(element)
    if typname == "numeric":
        return numeric_type(typmod)
    return _SCALARS.get(typname)


@dataclass(frozen=True)
class Column:
    """One result column: its name, PostgreSQL type and the Arrow type it is read as."""

    name: str
    typname: str
    typmod: int
    arrow: pa.DataType

    @property
    def select(self) -> str:
        """How the COPY's select list names this column.

        uuid is cast to text by the server (docs/postgres.md). numeric is too, in this reader
        only: the driver's own decoding of binary numeric is its slowest path by far, and Arrow
        parses the server's exact text into decimal128 (or keeps it) faster. The values are the
        same either way.
        """
        ref = f"dativo_src.{quote_ident(self.name)}"
        if self.typname in ("uuid", "numeric"):
            return f"{ref}::text AS {quote_ident(self.name)}"
        if self.typname in ("_uuid", "_numeric"):
            return f"{ref}::text[] AS {quote_ident(self.name)}"
        return ref


def _field_type(field: pa.Field) -> tuple[str, int]:
    """(`pg_type.typname`, type modifier) of a described field; -1 when unknown."""
    meta = {k.decode(): v.decode() for k, v in (field.metadata or {}).items()}
    typname = meta.get("POSTGRESQL:type") or meta.get("ADBC:postgresql:typname") or "?"
    return typname, int(meta.get("POSTGRESQL:typmod", "-1"))


def describe(schema: pa.Schema, element_typmods: dict[str, int] | None = None) -> list[Column]:
    """Columns of a result, from the driver's described schema (type names and modifiers).

    The driver reports no modifier for an array column; `element_typmods` gives those of
    `numeric[]` columns (read off `column[1]`, whose modifier the server does report).

    Raises:
        SourceError: a duplicate column name, or a type this reader cannot read.
    """
    columns: list[Column] = []
    seen: set[str] = set()
    for field in schema:
        typname, typmod = _field_type(field)
        if typname == "_numeric" and element_typmods:
            typmod = element_typmods.get(field.name, typmod)
        if field.name in seen:
            raise SourceError(
                f'{_PLUGIN}: the result has two columns named "{field.name}"; alias one of them '
                "in the query"
            )
        seen.add(field.name)
        arrow = arrow_type_for(typname, typmod)
        if arrow is None:
            shown = typname[1:] + "[]" if typname.startswith("_") else typname
            raise SourceError(
                f'{_PLUGIN}: column "{field.name}" has type {shown}, which the postgres reader '
                f'cannot read; cast it in a query, for example "{field.name}"::text'
            )
        columns.append(Column(field.name, typname, typmod, arrow))
    return columns


def _storage(array: pa.Array) -> pa.Array:
    return array.storage if isinstance(array, pa.ExtensionArray) else array


# How the server spells the numeric values decimal128 cannot hold.
_SPECIAL_NUMERIC = ("NaN", "Infinity", "-Infinity")


class _Converter:
    """Turns one column of the driver's batches into the documented Arrow type."""

    def __init__(self, column: Column) -> None:
        self.column = column

    def __call__(self, array: pa.Array) -> pa.Array:
        return self._convert(_storage(array), self.column.arrow, self.column.typname.lstrip("_"))

    def _convert(self, array: pa.Array, target: pa.DataType, typname: str) -> pa.Array:
        if pa.types.is_list(target):
            values = self._convert(_storage(array.values), target.value_type, typname)
            return pa.ListArray.from_arrays(
                array.offsets,
                values,
                type=target,
                mask=array.is_null() if array.null_count else None,
            )
        if typname == "numeric":
            if pa.types.is_decimal(target):
                return self._decimal(array, target)
            return array  # the server's own text (the select list casts numeric to text)
        if typname == "date" and len(array):
            self._check_finite(array.cast(pa.int32()), _MIN_DATE, "date")
        elif typname in ("timestamp", "timestamptz") and len(array):
            self._check_finite(array.cast(pa.int64()), _MIN_TIMESTAMP_US, typname)
        if array.type != target:
            array = array.cast(target)
        return array

    def _decimal(self, array: pa.Array, target: pa.DataType) -> pa.Array:
        try:
            return pc.cast(array, target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            special = pc.any(pc.is_in(array, pa.array(_SPECIAL_NUMERIC))).as_py()
            what = "NaN or an infinity" if special else "a value that does not fit"
            raise SourceError(
                f'{_PLUGIN}: column "{self.column.name}" holds {what}, which '
                f"decimal({target.precision},{target.scale}) cannot hold; cast it to text in a "
                f'query, for example "{self.column.name}"::text'
            ) from None

    def _check_finite(self, values: pa.Array, lowest: int, typname: str) -> None:
        smallest = pc.min(values).as_py()
        if smallest is not None and smallest < lowest:
            raise SourceError(
                f'{_PLUGIN}: column "{self.column.name}" holds infinity or -infinity, which '
                f"Arrow's {typname} cannot hold; filter those rows or cast the column to text "
                f'in a query, for example "{self.column.name}"::text'
            )


# ---------------------------------------------------------------------------------------------
# Connections


def _conninfo_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class PostgresReader(DataReader):
    """Reads a table or query from PostgreSQL (docs/postgres.md)."""

    name = "postgres"
    version = "0.1.0"

    def __init__(self) -> None:
        self.config: PostgresConfig | None = None
        self.context: PluginContext | None = None
        self._conninfo = ""
        self._where = "host"
        self._conn: Any = None
        self._columns: list[Column] = []
        self._schema: pa.Schema | None = None
        self._bounds: tuple[str | None, str | None] = (None, None)  # (lo, hi) text forms
        self._cursor_type = ""
        self._state: dict[str, Any] | None = None
        self._workers: list[threading.Thread] = []
        self._stop = threading.Event()
        self._connections: list[Any] = []
        self._lock = threading.Lock()

    # -- set-up -----------------------------------------------------------------------------

    def initialize(self, config: dict[str, Any], context: PluginContext) -> None:
        self.config = cfg = parse_plugin_config(PostgresConfig, config, _PLUGIN)
        self.context = context
        # A non-incremental read saves no cursor; an incremental one keeps the saved cursor
        # until a run finds rows above it.
        self._state = context.state if cfg.incremental is not None else None
        self._conninfo, self._where = self._connection_string(cfg, context)
        self._conn = self._connect()
        cursor = self._conn.cursor()
        try:
            self._execute(cursor, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            if cfg.table is not None:
                self._check_table(cursor, cfg.table)
            schema = self._call(
                lambda: cursor.adbc_execute_schema(
                    f"SELECT * FROM {source_sql(cfg)} AS dativo_src LIMIT 0"
                ),
                "describing the source",
            )
            arrays = [f.name for f in schema if _field_type(f)[0] == "_numeric"]
            element_typmods: dict[str, int] = {}
            if arrays:
                elements = self._call(
                    lambda: cursor.adbc_execute_schema(
                        "SELECT "
                        + ", ".join(
                            f"dativo_src.{quote_ident(a)}[1] AS {quote_ident(a)}" for a in arrays
                        )
                        + f" FROM {source_sql(cfg)} AS dativo_src LIMIT 0"
                    ),
                    "describing the source",
                )
                element_typmods = {f.name: _field_type(f)[1] for f in elements}
            self._columns = describe(schema, element_typmods)
            self._schema = pa.schema([pa.field(c.name, c.arrow) for c in self._columns])
            if cfg.incremental is not None:
                self._bounds = self._incremental_bounds(cursor, cfg.incremental)
        finally:
            cursor.close()
        context.log.info(
            "connected to PostgreSQL at %s:%d via %s; %d column(s)",
            cfg.host,
            cfg.port,
            self._where,
            len(self._columns),
        )

    @staticmethod
    def _connection_string(cfg: PostgresConfig, context: PluginContext) -> tuple[str, str]:
        destination = f"{cfg.host.lower()}:{cfg.port}"
        grant = context.network.get(destination)
        if grant is None:
            granted = ", ".join(sorted(context.network)) or "none"
            raise PluginConfigError(
                f"{_PLUGIN}: host:port {destination} is not granted (granted: {granted}); add "
                f"it to the reader's network: [{destination}]"
            )
        parts = {
            "dbname": cfg.database,
            "user": cfg.user,
            "connect_timeout": str(cfg.connect_timeout),
            "application_name": cfg.application_name,
            "sslmode": cfg.sslmode,
            "port": str(cfg.port),
        }
        if cfg.password is not None:
            parts["password"] = cfg.password
        if cfg.sslmode == "disable" and grant.socket_dir is not None:
            parts["host"] = grant.socket_dir
            where = "its granted Unix socket"
        else:
            # Through the loopback relay (or directly, unsandboxed); TLS checks the real name.
            parts["host"] = grant.host
            where = f"TCP {grant.host}:{grant.port}"
            if grant.host.lower() != cfg.host.lower():
                # The relay's address; `host` stays the real name, for TLS to check.
                parts["hostaddr"] = grant.host
                parts["host"] = cfg.host
        return " ".join(f"{k}={_conninfo_value(v)}" for k, v in parts.items()), where

    def _connect(self) -> Any:
        import adbc_driver_postgresql.dbapi as pgdb  # type: ignore[import-untyped]

        cfg = self.config
        assert cfg is not None
        try:
            conn = pgdb.connect(self._conninfo, autocommit=True)
        except Exception as exc:  # the driver's errors carry libpq's message
            raise self._connect_error(exc) from None
        with self._lock:
            self._connections.append(conn)
        return conn

    def _connect_error(self, exc: Exception) -> SourceError:
        cfg = self.config
        assert cfg is not None
        text = _libpq_message(exc)
        at = f"{cfg.host}:{cfg.port}"
        if "password authentication failed" in text or (
            "role" in text and "does not exist" in text
        ):
            reason = text.split("FATAL:", 1)[-1].strip()
            return SourceError(
                f'{_PLUGIN}: PostgreSQL at {at} refused the login of user "{cfg.user}": {reason}'
            )
        if "database" in text and "does not exist" in text:
            return SourceError(f'{_PLUGIN}: database "{cfg.database}" does not exist on {at}')
        if "FATAL:" in text:
            return SourceError(
                f"{_PLUGIN}: PostgreSQL at {at} refused the connection: "
                + text.split("FATAL:", 1)[1].strip()
            )
        reason = text.split("failed:", 1)[-1].strip().split("\n")[0]
        return SourceError(
            f"{_PLUGIN}: cannot connect to PostgreSQL at {at}: {reason}", transient=True
        )

    def _execute(self, cursor: Any, sql: str, what: str = "") -> None:
        self._call(lambda: cursor.execute(sql), what or sql.split(" ", 1)[0])

    def _call(self, fn: Callable[[], Any], what: str) -> Any:
        try:
            return fn()
        except SourceError:
            raise
        except Exception as exc:
            text = _libpq_message(exc)
            where = " in `query`" if self.config is not None and self.config.query else ""
            raise SourceError(f"{_PLUGIN}: {what} failed{where}: {text}") from None

    def _check_table(self, cursor: Any, table: str) -> None:
        cfg = self.config
        assert cfg is not None
        self._execute(
            cursor,
            f"SELECT to_regclass({quote_literal(qualified_table(table))})::text",
            "looking up the table",
        )
        row = cursor.fetchone()
        if row is None or row[0] is None:
            raise SourceError(
                f'{_PLUGIN}: table "{table}" does not exist in database "{cfg.database}" '
                f'(or user "{cfg.user}" cannot see it)'
            )

    def _incremental_bounds(
        self, cursor: Any, inc: IncrementalConfig
    ) -> tuple[str | None, str | None]:
        cfg = self.config
        assert cfg is not None
        column = next((c for c in self._columns if c.name == inc.column), None)
        if column is None:
            raise PluginConfigError(
                f"{_PLUGIN}: `incremental.column` `{inc.column}` is not a column of the source; "
                f"columns: {', '.join(c.name for c in self._columns)}"
            )
        if column.typname not in _CURSOR_TYPES:
            raise PluginConfigError(
                f"{_PLUGIN}: `incremental.column` `{inc.column}` has type {column.typname}; a "
                f"cursor column must be one of {', '.join(sorted(_CURSOR_TYPES))}"
            )
        saved = self._state.get("cursor") if self._state else None
        if isinstance(saved, dict) and saved.get("column") not in (None, inc.column):
            raise PluginConfigError(
                f"{_PLUGIN}: the saved cursor is for column `{saved.get('column')}`, not "
                f"`{inc.column}`; run `dativo state reset` for this job to start over"
            )
        lo = saved.get("value") if isinstance(saved, dict) else None
        if lo is None:
            lo = inc.start
        self._execute(
            cursor,
            f"SELECT format_type({quote_literal(column.typname)}::regtype, {column.typmod})",
            "looking up the cursor type",
        )
        self._cursor_type = str(cursor.fetchone()[0])
        where = "" if lo is None else f" WHERE {self._cursor_test(lo)}"
        self._execute(
            cursor,
            f"SELECT max({quote_ident(inc.column)})::text FROM {source_sql(cfg)} AS dativo_src"
            + where,
            "finding the new cursor",
        )
        hi = cursor.fetchone()[0]
        return lo, hi

    def _cursor_test(self, lo: str) -> str:
        cfg = self.config
        assert cfg is not None
        assert cfg.incremental is not None
        op = ">" if cfg.incremental.mode == "exclusive" else ">="
        return (
            f"{quote_ident(cfg.incremental.column)} {op} {quote_literal(lo)}::{self._cursor_type}"
        )

    # -- reading ----------------------------------------------------------------------------

    def get_schema(self) -> pa.Schema:
        assert self._schema is not None
        return self._schema

    def copy_sql(self, part: str | None = None) -> str:
        """The SELECT the driver wraps in `COPY (...) TO STDOUT (FORMAT binary)`."""
        cfg = self.config
        assert cfg is not None
        tests: list[str] = []
        if cfg.incremental is not None:
            lo, hi = self._bounds
            if lo is not None:
                tests.append(self._cursor_test(lo))
            assert hi is not None
            column = quote_ident(cfg.incremental.column)
            tests.append(f"{column} <= {quote_literal(hi)}::{self._cursor_type}")
        select = ", ".join(c.select for c in self._columns) or "*"
        where = f" WHERE {' AND '.join(f'({t})' for t in tests)}" if tests else ""
        return f"SELECT {select} FROM {source_sql(cfg, part)} AS dativo_src{where}"

    def read_batch(self, batch_size: int) -> Iterator[pa.RecordBatch]:
        cfg = self.config
        assert cfg is not None
        assert self._schema is not None
        if cfg.incremental is not None and self._bounds[1] is None:
            self._finish()
            return  # nothing above the saved cursor
        converters = [_Converter(c) for c in self._columns]
        if cfg.parallel.workers > 1:
            batches = self._parallel(cfg.parallel)
        else:
            batches = self._stream(self._conn, self.copy_sql())
        for raw in batches:
            batch = pa.RecordBatch.from_arrays(
                [convert(raw.column(i)) for i, convert in enumerate(converters)],
                schema=self._schema,
            )
            for offset in range(0, batch.num_rows, batch_size):
                yield batch.slice(offset, batch_size)
        self._finish()

    def _stream(self, conn: Any, sql: str) -> Iterator[pa.RecordBatch]:
        cursor = conn.cursor()
        try:
            self._execute(cursor, sql, "reading")
            reader = self._call(cursor.fetch_record_batch, "reading")
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                except Exception as exc:
                    raise SourceError(f"{_PLUGIN}: reading failed: {_libpq_message(exc)}") from None
                yield batch
        finally:
            cursor.close()

    def _finish(self) -> None:
        cfg = self.config
        assert cfg is not None
        cursor = self._conn.cursor()
        try:
            self._execute(cursor, "COMMIT")
        finally:
            cursor.close()
        if cfg.incremental is not None and self._bounds[1] is not None:
            self._state = {"cursor": {"column": cfg.incremental.column, "value": self._bounds[1]}}

    # -- parallel ----------------------------------------------------------------------------

    def _parallel(self, parallel: ParallelConfig) -> Iterator[pa.RecordBatch]:
        cfg = self.config
        assert cfg is not None
        assert cfg.table is not None
        cursor = self._conn.cursor()
        try:
            self._execute(cursor, "SELECT pg_export_snapshot()", "exporting the snapshot")
            snapshot = str(cursor.fetchone()[0])
            ranges = self._ranges(cursor, parallel)
        finally:
            cursor.close()
        out: queue.Queue[pa.RecordBatch | BaseException | None] = queue.Queue(maxsize=4)

        def work(condition: str) -> None:
            try:
                conn = self._connect()
                worker = conn.cursor()
                try:
                    self._execute(worker, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    self._execute(
                        worker, f"SET TRANSACTION SNAPSHOT {quote_literal(snapshot)}", "SET"
                    )
                finally:
                    worker.close()
                for batch in self._stream(conn, self.copy_sql(condition)):
                    if self._stop.is_set():
                        return
                    out.put(batch)
            except BaseException as exc:  # handed to the consumer, which raises it
                out.put(exc)
            finally:
                out.put(None)

        self._workers = [
            threading.Thread(target=work, args=(c,), name=f"dativo-pg-{i}", daemon=True)
            for i, c in enumerate(ranges)
        ]
        for thread in self._workers:
            thread.start()
        running = len(self._workers)
        try:
            while running:
                item = out.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            self._stop.set()
            while any(t.is_alive() for t in self._workers):
                with contextlib.suppress(queue.Empty):
                    out.get(timeout=0.1)

    def _ranges(self, cursor: Any, parallel: ParallelConfig) -> list[str]:
        cfg = self.config
        assert cfg is not None
        assert cfg.table is not None
        n = parallel.workers
        table = quote_literal(qualified_table(cfg.table))
        if parallel.by == "ctid":
            self._execute(
                cursor,
                f"SELECT (pg_relation_size({table}::regclass) / "
                "current_setting('block_size')::int)::bigint",
                "sizing the table",
            )
            pages = int(cursor.fetchone()[0])
            step = max(1, -(-pages // n))
            bounds = [i * step for i in range(n)]
            ranges = []
            for i, low in enumerate(bounds):
                test = f"ctid >= '({low},0)'::tid"
                if i < n - 1:
                    test += f" AND ctid < '({bounds[i + 1]},0)'::tid"
                ranges.append(test)
            return ranges
        column = next((c for c in self._columns if c.name == parallel.by), None)
        if column is None or column.typname not in ("int2", "int4", "int8"):
            raise PluginConfigError(
                f"{_PLUGIN}: `parallel.by` must be `ctid` or an integer column of the table; "
                f"got `{parallel.by}`"
            )
        key = quote_ident(parallel.by)
        self._execute(
            cursor,
            f"SELECT min({key})::text, max({key})::text FROM {source_sql(cfg)} AS dativo_src",
            "finding the key range",
        )
        low_text, high_text = cursor.fetchone()
        if low_text is None:
            return ["TRUE"]  # no key values at all: one range reads everything
        low, high = int(low_text), int(high_text)
        step = max(1, -(-(high - low + 1) // n))
        ranges = []
        for i in range(n):
            start = low + i * step
            if start > high and i:
                break
            test = f"{key} >= {start}"
            if i < n - 1:
                test += f" AND {key} < {start + step}"
            ranges.append(test if i else f"{key} IS NULL OR ({test})")
        return ranges

    # -- end ---------------------------------------------------------------------------------

    def get_incremental_state(self) -> dict[str, Any] | None:
        return self._state

    def close(self) -> None:
        self._stop.set()
        for thread in self._workers:
            thread.join(timeout=5)
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            with contextlib.suppress(Exception):
                conn.close()


def _libpq_message(exc: BaseException) -> str:
    """The server's or libpq's words, without the driver's prefixes and echoed query."""
    text = str(exc)
    for prefix in ("IO: ", "NOT_FOUND: ", "INVALID_ARGUMENT: ", "INTERNAL: ", "UNKNOWN: "):
        text = text.removeprefix(prefix)
    text = text.removeprefix("[libpq] ")
    text = text.split("\n\nQuery was:", 1)[0]
    text = text.replace("Failed to prepare query: ", "").replace("Failed to execute query: ", "")
    return " ".join(text.split())
