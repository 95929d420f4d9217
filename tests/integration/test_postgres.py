"""The PostgreSQL readers against a real server: every documented type, incremental runs, errors.

Each reader runs through the real supervisor into the built-in `parquet` writer, and the
published Parquet is compared with the Arrow table docs/postgres.md says each type becomes:

* `python`: the built-in `postgres` reader in its signed container (`dativo/builtin-postgres`);
* `python-unsandboxed`: the same class in the supervisor's process (the `--in-process` mode),
  which shows a failure's cause without a container in the way;
* `rust`: `dativo/rust-postgres` (plugin-images/rust-postgres), built by `make images`.

Every test parametrised over these readers checks each against the same expected table, so the
readers agree with each other type by type; `test_readers_agree` compares their output
directly.

The server is the locally built `dativo/svc-postgres` image (`make services`), reached by the
supervisor at the container's address on the services network.
"""

from __future__ import annotations

import datetime as dt
import decimal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests.services import PostgresService, ServiceError, postgres_service

from dativo.config import parse_job
from dativo.errors import ConfigError, PluginError
from dativo.supervisor import RunOptions, RunReport, run_job

pytestmark = pytest.mark.docker

PASSWORD_ENV = "DATIVO_TEST_PG_PASSWORD"
UUID = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"

TYPES_DDL = """
CREATE TABLE types (
    id int4 PRIMARY KEY,
    b bool, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8,
    n12 numeric(12,2), n38 numeric(38,10), nu numeric, n40 numeric(40,5),
    t text, vc varchar(10), bp char(5), nm name, ba bytea,
    d date, tm time, ts timestamp, tz timestamptz,
    u uuid, j json, jb jsonb,
    ai int4[], at text[], an numeric(6,2)[], au uuid[], ad date[], a2 int8[]
);
INSERT INTO types VALUES (
    1, true, -32768, 2147483647, -9223372036854775808, 1.5, -2.25e300,
    1234567890.12, -1234567890123456789012345678.0123456789,
    3.14159265358979323846264338327950288419716939937510, 12345678901234567890123456789012345.12345,
    'héllo, wörld ✓', 'ab''c', 'ab', 'pg_name', '\\x00ff10',
    '2024-02-29', '23:59:59.999999', '1999-12-31 23:59:59.123456', '2024-01-02 03:04:05.5+02',
    'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', '{"a": [1, 2], "b": null}', '{"z": 1, "a": {"k": "v"}}',
    '{1,NULL,3}', '{"x",NULL,""}', '{1.50,NULL}', '{A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11}',
    '{2020-01-01}', '{{1,2},{3,4}}'
);
INSERT INTO types (id) VALUES (2);
INSERT INTO types VALUES (
    3, false, 0, 0, 0, 'NaN', '-Infinity', 0.00, 0, 'NaN', -0.5,
    '', '', '', '', '\\x', '0001-01-01', '00:00', '1970-01-01 00:00', '1970-01-01 00:00+00',
    '00000000-0000-0000-0000-000000000000', '[]', '{}',
    '{}', '{}', '{}', '{}', '{}', '{}'
);
"""


def expected_types() -> pa.Table:
    """What docs/postgres.md says `types` reads as, row for row."""
    utc = dt.UTC
    d = decimal.Decimal
    rows = [
        {
            "id": 1,
            "b": True,
            "i2": -32768,
            "i4": 2147483647,
            "i8": -9223372036854775808,
            "f4": 1.5,
            "f8": -2.25e300,
            "n12": d("1234567890.12"),
            "n38": d("-1234567890123456789012345678.0123456789"),
            "nu": "3.14159265358979323846264338327950288419716939937510",
            "n40": "12345678901234567890123456789012345.12345",
            "t": "héllo, wörld ✓",
            "vc": "ab'c",
            "bp": "ab   ",
            "nm": "pg_name",
            "ba": b"\x00\xff\x10",
            "d": dt.date(2024, 2, 29),
            "tm": dt.time(23, 59, 59, 999999),
            "ts": dt.datetime(1999, 12, 31, 23, 59, 59, 123456),
            "tz": dt.datetime(2024, 1, 2, 1, 4, 5, 500000, tzinfo=utc),
            "u": UUID,
            "j": '{"a": [1, 2], "b": null}',
            "jb": '{"a": {"k": "v"}, "z": 1}',
            "ai": [1, None, 3],
            "at": ["x", None, ""],
            "an": [d("1.50"), None],
            "au": [UUID],
            "ad": [dt.date(2020, 1, 1)],
            "a2": [1, 2, 3, 4],
        },
        {"id": 2},
        {
            "id": 3,
            "b": False,
            "i2": 0,
            "i4": 0,
            "i8": 0,
            "f4": float("nan"),
            "f8": float("-inf"),
            "n12": d("0.00"),
            "n38": d("0E-10"),
            "nu": "NaN",
            "n40": "-0.50000",
            "t": "",
            "vc": "",
            "bp": "     ",
            "nm": "",
            "ba": b"",
            "d": dt.date(1, 1, 1),
            "tm": dt.time(0, 0),
            "ts": dt.datetime(1970, 1, 1),
            "tz": dt.datetime(1970, 1, 1, tzinfo=utc),
            "u": "00000000-0000-0000-0000-000000000000",
            "j": "[]",
            "jb": "{}",
            "ai": [],
            "at": [],
            "an": [],
            "au": [],
            "ad": [],
            "a2": [],
        },
    ]
    schema = pa.schema(
        [
            ("id", pa.int32()), ("b", pa.bool_()), ("i2", pa.int16()), ("i4", pa.int32()),
            ("i8", pa.int64()), ("f4", pa.float32()), ("f8", pa.float64()),
            ("n12", pa.decimal128(12, 2)), ("n38", pa.decimal128(38, 10)), ("nu", pa.string()),
            ("n40", pa.string()), ("t", pa.string()), ("vc", pa.string()), ("bp", pa.string()),
            ("nm", pa.string()), ("ba", pa.binary()), ("d", pa.date32()),
            ("tm", pa.time64("us")), ("ts", pa.timestamp("us")),
            ("tz", pa.timestamp("us", tz="UTC")), ("u", pa.string()), ("j", pa.string()),
            ("jb", pa.string()), ("ai", pa.list_(pa.int32())), ("at", pa.list_(pa.string())),
            ("an", pa.list_(pa.decimal128(6, 2))), ("au", pa.list_(pa.string())),
            ("ad", pa.list_(pa.date32())), ("a2", pa.list_(pa.int64())),
        ]
    )  # fmt: skip
    return pa.Table.from_pylist(rows, schema=schema)


# -- fixtures ------------------------------------------------------------------------------------

# `rust` needs `dativo/rust-postgres:0.1.0` (`make images`); a missing image fails its runs.
READERS = ["python", "python-unsandboxed", "rust"]


@pytest.fixture(scope="module")
def pg(docker_engine: str) -> Iterator[PostgresService]:
    """A fresh PostgreSQL holding `types`; a missing image fails (`make services`)."""
    import psycopg

    try:
        # A password unlike any name in the messages, so masking it hides nothing else.
        service = postgres_service(password="pg-Test-Secret-7")
        pg = service.__enter__()
    except ServiceError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute(TYPES_DDL)
            conn.execute("CREATE TABLE odd (id int4, period interval)")
        yield pg
    finally:
        service.__exit__(None, None, None)


@pytest.fixture(autouse=True)
def password(monkeypatch: pytest.MonkeyPatch, pg: PostgresService) -> None:
    monkeypatch.setenv(PASSWORD_ENV, pg.password)


def sql(pg: PostgresService, *statements: str) -> None:
    import psycopg

    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def reader_spec(kind: str, pg: PostgresService, config: dict[str, Any]) -> dict[str, Any]:
    destination = f"{pg.container_ip}:5432"
    base = {
        "host": pg.container_ip,
        "port": 5432,
        "database": pg.database,
        "user": pg.user,
        "password": "${" + PASSWORD_ENV + "}",
        # The container readers take the Unix socket; the unsandboxed one connects over TCP
        # (test_python_reader_through_the_tcp_relay covers TCP from a container).
        "sslmode": "prefer" if kind == "python-unsandboxed" else "disable",
        **config,
    }
    if kind == "rust":
        return {
            "type": "image",
            "image": "dativo/rust-postgres:0.1.0",
            "network": [destination],
            "config": base,
        }
    return {"type": "builtin", "name": "postgres", "network": [destination], "config": base}


def make_job(tmp_path: Path, kind: str, pg: PostgresService, config: dict[str, Any]) -> Any:
    return parse_job(
        {
            "version": 1,
            "name": f"pg-{kind}",
            "source": {"reader": reader_spec(kind, pg, config)},
            "target": {"path": "out", "writer": {"type": "builtin", "name": "parquet"}},
            "state": {"path": "state.db"},
            "run": {"batch_size": 2},
        },
        source="job.yaml",
        base_dir=tmp_path,
    )


def run(tmp_path: Path, kind: str, pg: PostgresService, config: dict[str, Any]) -> RunReport:
    job = make_job(tmp_path, kind, pg, config)
    return run_job(job, RunOptions(in_process=kind == "python-unsandboxed"))


def published(tmp_path: Path) -> pa.Table:
    files = sorted(
        p for p in (tmp_path / "out").rglob("*.parquet") if ".dativo-staging" not in p.parts
    )
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else pa.table({})


def sorted_by_id(table: pa.Table) -> pa.Table:
    return table.sort_by("id")


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", READERS)
def test_every_type_reads_as_documented(tmp_path: Path, pg: PostgresService, kind: str) -> None:
    report = run(tmp_path, kind, pg, {"table": "public.types"})
    assert report.rows == 3
    got = sorted_by_id(published(tmp_path))
    want = expected_types()
    # Parquet names a list's child `element`; Arrow's default is `item`: nothing else differs.
    assert [(f.name, str(f.type).replace("element", "item")) for f in got.schema] == [
        (f.name, str(f.type)) for f in want.schema
    ]
    for name in want.column_names:
        g, w = got.column(name).to_pylist(), want.column(name).to_pylist()
        if name == "f4":  # NaN != NaN
            assert [str(v) for v in g] == [str(v) for v in w]
        else:
            assert g == w, name


@pytest.mark.parametrize("kind", READERS)
def test_query_with_casts_and_columns(tmp_path: Path, pg: PostgresService, kind: str) -> None:
    run(
        tmp_path,
        kind,
        pg,
        {
            "query": "SELECT id, (n12 * 2)::numeric(14,2) AS twice, t || '!' AS shout, "
            "u FROM types WHERE id <> 2 ORDER BY id",
        },
    )
    got = sorted_by_id(published(tmp_path))
    assert got.schema == pa.schema(
        [
            ("id", pa.int32()),
            ("twice", pa.decimal128(14, 2)),
            ("shout", pa.string()),
            ("u", pa.string()),
        ]
    )
    assert got.column("twice").to_pylist() == [
        decimal.Decimal("2469135780.24"),
        decimal.Decimal("0.00"),
    ]
    assert got.column("shout").to_pylist() == ["héllo, wörld ✓!", "!"]


@pytest.mark.parametrize("kind", READERS)
def test_three_incremental_runs_load_each_row_version_once(
    tmp_path: Path, pg: PostgresService, kind: str
) -> None:
    table = f"events_{kind.replace('-', '_')}"
    sql(
        pg,
        f"DROP TABLE IF EXISTS {table}",
        f"CREATE TABLE {table} (id int4 PRIMARY KEY, v text, updated_at timestamptz NOT NULL)",
        f"INSERT INTO {table} SELECT g, 'v1', '2024-01-01'::timestamptz + g * interval '1 min' "
        "FROM generate_series(1, 5) g",
    )
    config = {"table": table, "incremental": {"column": "updated_at"}}
    seen: list[tuple[int, str]] = []

    def load() -> int:
        return run(tmp_path, kind, pg, config).rows

    assert load() == 5
    sql(
        pg,
        f"INSERT INTO {table} VALUES (6, 'v1', '2024-02-01'), (7, 'v1', '2024-02-01')",
        f"UPDATE {table} SET v = 'v2', updated_at = '2024-02-02' WHERE id IN (1, 2)",
    )
    assert load() == 4
    assert load() == 0  # nothing new: nothing read
    sql(pg, f"UPDATE {table} SET v = 'v3', updated_at = '2024-03-01' WHERE id = 1")
    assert load() == 1
    for row in published(tmp_path).to_pylist():
        seen.append((row["id"], row["v"]))
    assert sorted(seen) == sorted(
        [(i, "v1") for i in range(1, 8)] + [(1, "v2"), (2, "v2"), (1, "v3")]
    )
    assert len(seen) == len(set(seen))  # each row version exactly once


@pytest.mark.parametrize("kind", ["python", "python-unsandboxed"])
@pytest.mark.parametrize("by", ["ctid", "id"])
def test_parallel_read_sees_one_snapshot(
    tmp_path: Path, pg: PostgresService, kind: str, by: str
) -> None:
    table = f"big_{by}_{kind.replace('-', '_')}"
    sql(
        pg,
        f"DROP TABLE IF EXISTS {table}",
        f"CREATE TABLE {table} AS SELECT g AS id, md5(g::text) AS v "
        "FROM generate_series(1, 20000) g",
        f"INSERT INTO {table} VALUES (NULL, 'null key')",
    )
    run(tmp_path, kind, pg, {"table": table, "parallel": {"workers": 3, "by": by}})
    got = published(tmp_path)
    assert got.num_rows == 20001
    ids = got.column("id").to_pylist()
    assert sorted(i for i in ids if i is not None) == list(range(1, 20001))
    assert ids.count(None) == 1


def failure(tmp_path: Path, pg: PostgresService, kind: str, config: dict[str, Any]) -> str:
    with pytest.raises((PluginError, ConfigError)) as caught:
        run(tmp_path, kind, pg, config)
    assert not list((tmp_path / "out").rglob("*.parquet"))  # nothing published
    return str(caught.value)


@pytest.mark.parametrize("kind", READERS)
def test_errors_are_plain(
    tmp_path: Path, pg: PostgresService, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = failure(tmp_path, pg, kind, {"table": "public.nope"})
    assert 'table "public.nope" does not exist in database "dativo"' in message

    message = failure(tmp_path, pg, kind, {"table": "odd"})
    assert 'column "period" has type interval' in message
    assert '"period"::text' in message

    message = failure(tmp_path, pg, kind, {"query": "SELEC 1"})
    assert "syntax error" in message

    monkeypatch.setenv(PASSWORD_ENV, "wrong-password-value")
    message = failure(tmp_path, pg, kind, {"table": "types"})
    assert 'refused the login of user "dativo"' in message
    assert "password authentication failed" in message
    assert "wrong-password-value" not in message


@pytest.mark.parametrize("kind", READERS)
def test_host_not_granted(tmp_path: Path, pg: PostgresService, kind: str) -> None:
    message = failure(tmp_path, pg, kind, {"table": "types", "host": "db.example.com"})
    assert "db.example.com:5432 is not granted" in message
    assert "network: [db.example.com:5432]" in message


@pytest.mark.parametrize(
    "config",
    [
        {"table": "public.types"},
        {"query": "SELECT id, n12::numeric(20,4) AS n, ai, u FROM types ORDER BY id"},
    ],
)
def test_readers_agree(tmp_path: Path, pg: PostgresService, config: dict[str, Any]) -> None:
    """The Python and the Rust reader publish equal tables from the same source."""
    tables = {}
    for kind in ("python", "rust"):
        run(tmp_path / kind, kind, pg, config)
        tables[kind] = sorted_by_id(published(tmp_path / kind))
    assert tables["python"].schema == tables["rust"].schema
    assert tables["python"].num_rows == tables["rust"].num_rows > 0
    for name in tables["python"].column_names:
        python, rust = tables["python"].column(name), tables["rust"].column(name)
        assert [str(v) for v in python.to_pylist()] == [str(v) for v in rust.to_pylist()], name


def test_python_reader_through_the_tcp_relay(tmp_path: Path, pg: PostgresService) -> None:
    """`sslmode: prefer` goes through the plugin host's loopback relay (TLS would be end to end;
    this server offers none, so the session is plain)."""
    report = run(tmp_path, "python", pg, {"table": "types", "sslmode": "prefer"})
    assert report.rows == 3
    assert report.plugins["reader"]["network"][f"{pg.container_ip}:5432"]["connections"] >= 1


@pytest.mark.parametrize("kind", READERS)
def test_incremental_start_and_inclusive(tmp_path: Path, pg: PostgresService, kind: str) -> None:
    config = {
        "query": "SELECT * FROM (VALUES (1, 'a'), (2, 'b'), (3, 'c')) AS v(id, v)",
        "incremental": {"column": "id", "mode": "inclusive", "start": "2"},
    }
    assert run(tmp_path, kind, pg, config).rows == 2
    assert sorted(published(tmp_path).column("id").to_pylist()) == [2, 3]
    # Inclusive: the row at the saved cursor is read again, nothing below it.
    assert run(tmp_path, kind, pg, config).rows == 1


@pytest.mark.parametrize("kind", READERS)
@pytest.mark.parametrize(
    ("query", "column", "value"),
    [
        ("SELECT 'infinity'::date AS d", "d", "infinity"),
        ("SELECT '-infinity'::timestamp AS ts", "ts", "-infinity"),
        ("SELECT 'NaN'::numeric(10,2) AS amount", "amount", "NaN"),
    ],
)
def test_unrepresentable_values_name_the_column(
    tmp_path: Path, pg: PostgresService, kind: str, query: str, column: str, value: str
) -> None:
    message = failure(tmp_path, pg, kind, {"query": query})
    assert f'column "{column}" holds' in message
    assert value in message


@pytest.mark.parametrize("kind", READERS)
def test_config_errors_name_the_key(tmp_path: Path, pg: PostgresService, kind: str) -> None:
    message = failure(tmp_path, pg, kind, {"table": "types", "tabel": "x"})
    assert "unknown" in message
    assert "`tabel`" in message
    assert "application_name" in message  # the valid keys are listed


def test_rust_reader_refuses_parallel(tmp_path: Path, pg: PostgresService) -> None:
    message = failure(tmp_path, pg, "rust", {"table": "types", "parallel": {"workers": 2}})
    assert "`parallel.workers` above 1 is not supported" in message


@pytest.mark.parametrize("kind", READERS)
def test_text_cursor_with_quotes_and_backslashes(
    tmp_path: Path, pg: PostgresService, kind: str
) -> None:
    config = {
        "query": "SELECT * FROM (VALUES ('a\\b'), ('it''s'), ('z\\''q')) AS v(k)",
        "incremental": {"column": "k"},
    }
    assert run(tmp_path, kind, pg, config).rows == 3
    assert run(tmp_path, kind, pg, config).rows == 0  # the saved cursor `z\'q` round-trips
