"""The Rust PostgreSQL reader (`dativo/rust-postgres`) against a real PostgreSQL, in real
containers: every type of docs/postgres.md, NULLs, the incremental cursor over three runs, and
the documented errors. The image is built and signed by `make images`
(`sandbox/build_images.py --only rust`); the service by `make services`.
"""

from __future__ import annotations

import datetime as dt
import decimal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests.services import PostgresService, ServiceError, postgres_service

from dativo.config import parse_job
from dativo.errors import PluginError
from dativo.supervisor import run_job

pytestmark = pytest.mark.docker

IMAGE = "dativo/rust-postgres:0.1.0"
D = decimal.Decimal
UTC = dt.UTC
# A role of its own, with a password unlike any other value in the messages (the supervisor masks
# the expanded password wherever it appears, and the service's own user, database and password
# are all `dativo`).
USER = "loader"
PASSWORD = "loader-s3cret"

# One table with every type the reader maps (docs/postgres.md, "Types").
TYPES_DDL = """
CREATE TABLE all_types (
    id integer PRIMARY KEY,
    b boolean, i2 smallint, i4 integer, i8 bigint, f4 real, f8 double precision,
    n numeric(12,2), n38 numeric(38,10), nfree numeric, nbig numeric(50,5),
    t text, vc varchar(10), c char(5), nm name, by bytea,
    d date, tm time, ts timestamp, tstz timestamptz,
    u uuid, j json, jb jsonb,
    ai integer[], at text[], an numeric(10,3)[], au uuid[], ats timestamptz[], af float8[]
);
INSERT INTO all_types VALUES (
    1, true, -32768, 2147483647, -9223372036854775808, 1.5, -2.25,
    1234567890.12, 1234567890123456789012345678.0123456789, 3.14159265358979323846264338,
    -12345678901234567890123456789012345678901234.56789,
    'héllo', 'varchar', 'ab', 'a_name', '\\x00ff10',
    '2024-02-29', '23:59:59.999999', '1999-12-31 23:59:59.5', '2024-01-02 03:04:05.123456+02',
    'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', '{"b": 1,  "a": [1, 2]}', '{"b": 1,  "a": [1, 2]}',
    '{1,NULL,3}', '{"x",NULL,"z z"}', '{1.5,NULL,-2.125}',
    '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12}', '{"2024-01-01 00:00:00+00"}', '{{1,2},{3,4}}'
);
INSERT INTO all_types (id) VALUES (2);
INSERT INTO all_types (id, f4, f8, nfree, d, ts, ai, at) VALUES
    (3, 'NaN', '-Infinity', 'NaN', '0001-01-01', '1970-01-01 00:00:00', '{}', '{}'),
    (4, '-Infinity', 'Infinity', '-0.000100', '1969-12-31', '2262-04-11 23:47:16', NULL, NULL);
"""


@pytest.fixture(scope="module")
def pg(docker_engine: str) -> Iterator[PostgresService]:
    """A fresh PostgreSQL with the test tables; a missing image fails (`make services`)."""
    try:
        import psycopg
    except ImportError:
        pytest.fail("psycopg is not installed: run `make venv` (VENV_EXTRAS)", pytrace=False)
    try:
        service = postgres_service()
        pg = service.__enter__()
    except ServiceError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute(TYPES_DDL)
            conn.execute("CREATE TABLE periods (id int, period interval)")
            conn.execute("CREATE TABLE events (id int, v text, updated_at timestamp)")
            conn.execute(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
            conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {USER}")
        yield pg
    finally:
        service.__exit__(None, None, None)


@pytest.fixture(scope="module")
def image(docker_engine: str) -> str:
    found = subprocess.run(
        ["docker", "image", "inspect", IMAGE], capture_output=True, text=True, check=False
    )
    if found.returncode != 0:
        pytest.fail(
            f"{IMAGE} is not in the engine: run `make images` (or "
            "`sandbox/build_images.py --only rust`)",
            pytrace=False,
        )
    return IMAGE


@pytest.fixture(autouse=True)
def pg_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATIVO_TEST_PGPASSWORD", PASSWORD)
    monkeypatch.setenv("DATIVO_TEST_BAD_PGPASSWORD", "not-the-password")


def sql(pg: PostgresService, statement: str) -> None:
    import psycopg

    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute(statement)  # type: ignore[arg-type]


def make_job(
    tmp_path: Path, pg: PostgresService, image: str, name: str = "rust-pg", **config: Any
) -> Any:
    grant = f"{pg.container_ip}:5432"
    reader_config: dict[str, Any] = {
        "host": pg.container_ip,
        "port": 5432,
        "database": pg.database,
        "user": USER,
        "password": "${DATIVO_TEST_PGPASSWORD}",
        **config,
    }
    return parse_job(
        {
            "version": 1,
            "name": name,
            "source": {
                "reader": {
                    "type": "image",
                    "image": image,
                    "network": [grant],
                    "config": reader_config,
                }
            },
            "target": {"path": "out", "writer": {"type": "builtin", "name": "parquet"}},
            "run": {"handshake_timeout": "60s", "batch_size": 2},
        },
        base_dir=tmp_path,
    )


def read_output(target: Path) -> pa.Table:
    files = sorted(p for p in target.rglob("*.parquet") if ".dativo-staging" not in p.parts)
    return pa.concat_tables([pq.read_table(f) for f in files])


def failure(tmp_path: Path, pg: PostgresService, image: str, **config: Any) -> PluginError:
    with pytest.raises(PluginError) as caught:
        run_job(make_job(tmp_path, pg, image, **config))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.parquet"))
    return caught.value


# -- types -------------------------------------------------------------------------------------


def test_every_type_reads_as_documented(tmp_path: Path, pg: PostgresService, image: str) -> None:
    report = run_job(make_job(tmp_path, pg, image, table="public.all_types"))
    assert report.status == "succeeded"
    table = read_output(tmp_path / "out").sort_by("id")
    item = pa.field("item", pa.int32())
    expected_types = {
        "id": pa.int32(),
        "b": pa.bool_(),
        "i2": pa.int16(),
        "i4": pa.int32(),
        "i8": pa.int64(),
        "f4": pa.float32(),
        "f8": pa.float64(),
        "n": pa.decimal128(12, 2),
        "n38": pa.decimal128(38, 10),
        "nfree": pa.string(),
        "nbig": pa.string(),
        "t": pa.string(),
        "vc": pa.string(),
        "c": pa.string(),
        "nm": pa.string(),
        "by": pa.binary(),
        "d": pa.date32(),
        "tm": pa.time64("us"),
        "ts": pa.timestamp("us"),
        "tstz": pa.timestamp("us", tz="UTC"),
        "u": pa.string(),
        "j": pa.string(),
        "jb": pa.string(),
        "ai": pa.list_(item),
        "at": pa.list_(pa.field("item", pa.string())),
        "an": pa.list_(pa.field("item", pa.decimal128(10, 3))),
        "au": pa.list_(pa.field("item", pa.string())),
        "ats": pa.list_(pa.field("item", pa.timestamp("us", tz="UTC"))),
        "af": pa.list_(pa.field("item", pa.float64())),
    }
    assert table.schema.names == list(expected_types)
    for field in table.schema:
        assert field.type == expected_types[field.name], field.name
        assert field.nullable, field.name
    rows = table.to_pylist()
    first = rows[0]
    assert first == {
        "id": 1,
        "b": True,
        "i2": -32768,
        "i4": 2147483647,
        "i8": -9223372036854775808,
        "f4": 1.5,
        "f8": -2.25,
        "n": D("1234567890.12"),
        "n38": D("1234567890123456789012345678.0123456789"),
        "nfree": "3.14159265358979323846264338",
        "nbig": "-12345678901234567890123456789012345678901234.56789",
        "t": "héllo",
        "vc": "varchar",
        "c": "ab   ",
        "nm": "a_name",
        "by": b"\x00\xff\x10",
        "d": dt.date(2024, 2, 29),
        "tm": dt.time(23, 59, 59, 999999),
        "ts": dt.datetime(1999, 12, 31, 23, 59, 59, 500000),
        "tstz": dt.datetime(2024, 1, 2, 1, 4, 5, 123456, tzinfo=UTC),
        "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "j": '{"b": 1,  "a": [1, 2]}',
        "jb": '{"a": [1, 2], "b": 1}',
        "ai": [1, None, 3],
        "at": ["x", None, "z z"],
        "an": [D("1.500"), None, D("-2.125")],
        "au": ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12"],
        "ats": [dt.datetime(2024, 1, 1, tzinfo=UTC)],
        "af": [1.0, 2.0, 3.0, 4.0],  # {{1,2},{3,4}} flattened in row-major order
    }
    # Row 2: NULL everywhere but the key.
    assert all(value is None for key, value in rows[1].items() if key != "id")
    # Special values.
    third, fourth = rows[2], rows[3]
    assert third["f4"] != third["f4"]  # NaN
    assert third["f8"] == float("-inf")
    assert fourth["f4"] == float("-inf")
    assert fourth["f8"] == float("inf")
    assert third["nfree"] == "NaN"
    assert fourth["nfree"] == "-0.000100"
    assert third["d"] == dt.date(1, 1, 1)
    assert fourth["d"] == dt.date(1969, 12, 31)
    assert third["ts"] == dt.datetime(1970, 1, 1)
    assert fourth["ts"] == dt.datetime(2262, 4, 11, 23, 47, 16)
    assert third["ai"] == []
    assert third["at"] == []
    assert fourth["ai"] is None
    # batch_size 2: four rows arrived in two batches.
    assert report.rows == 4


def test_columns_and_query(tmp_path: Path, pg: PostgresService, image: str) -> None:
    run_job(
        make_job(
            tmp_path / "a", pg, image, table="all_types", columns=["t", "id"], sslmode="disable"
        )
    )
    table = read_output(tmp_path / "a" / "out").sort_by("id")
    assert table.schema.names == ["t", "id"]
    assert table.column("t").to_pylist()[0] == "héllo"
    run_job(
        make_job(
            tmp_path / "b",
            pg,
            image,
            query="SELECT id, i2::numeric(6,1) AS n1, i8::text AS s FROM all_types WHERE id = 1",
        )
    )
    table = read_output(tmp_path / "b" / "out")
    assert table.schema.field("n1").type == pa.decimal128(6, 1)
    assert table.to_pylist() == [{"id": 1, "n1": D("-32768.0"), "s": "-9223372036854775808"}]


# -- incremental -------------------------------------------------------------------------------


def test_incremental_reads_each_row_version_once(
    tmp_path: Path, pg: PostgresService, image: str
) -> None:
    sql(
        pg,
        "INSERT INTO events VALUES (1, 'a', '2024-01-01 00:00:01'),"
        " (2, 'b', '2024-01-01 00:00:02'),"
        " (3, 'no cursor', NULL)",
    )
    job = make_job(tmp_path, pg, image, table="events", incremental={"column": "updated_at"})

    def run_and_read() -> list[tuple[int, str]]:
        before = (
            set((tmp_path / "out").rglob("*.parquet")) if (tmp_path / "out").exists() else set()
        )
        run_job(job)
        new = sorted(set((tmp_path / "out").rglob("*.parquet")) - before)
        rows = [r for f in new for r in pq.read_table(f).to_pylist()]
        return sorted((r["id"], r["v"]) for r in rows)

    assert run_and_read() == [(1, "a"), (2, "b")]  # NULL cursors are never read
    sql(pg, "INSERT INTO events VALUES (4, 'd', '2024-01-01 00:00:04')")
    sql(pg, "UPDATE events SET v = 'a2', updated_at = '2024-01-01 00:00:05' WHERE id = 1")
    assert run_and_read() == [(1, "a2"), (4, "d")]
    # Nothing new: the schema and no rows, the cursor kept.
    assert run_and_read() == []
    sql(pg, "UPDATE events SET v = 'b2', updated_at = '2024-01-01 00:00:06' WHERE id = 2")
    assert run_and_read() == [(2, "b2")]

    other = make_job(tmp_path, pg, image, table="events", incremental={"column": "id"})
    with pytest.raises(PluginError) as caught:
        run_job(other)
    assert caught.value.rule == "config"
    assert 'the saved cursor belongs to "updated_at"' in str(caught.value)


def test_incremental_start_and_inclusive(tmp_path: Path, pg: PostgresService, image: str) -> None:
    job = make_job(
        tmp_path,
        pg,
        image,
        name="rust-pg-start",
        query="SELECT * FROM (VALUES (1, 'a'), (2, 'b'), (3, 'c')) AS v(id, v)",
        incremental={"column": "id", "mode": "inclusive", "start": "2"},
    )
    run_job(job)
    ids = sorted(read_output(tmp_path / "out").column("id").to_pylist())
    assert ids == [2, 3]


# -- errors ------------------------------------------------------------------------------------


def test_wrong_password(tmp_path: Path, pg: PostgresService, image: str) -> None:
    error = failure(
        tmp_path, pg, image, table="all_types", password="${DATIVO_TEST_BAD_PGPASSWORD}"
    )
    assert error.rule == "source"
    assert f'PostgreSQL at {pg.container_ip}:5432 refused the login of user "{USER}"' in str(error)
    assert "password authentication failed" in str(error)
    assert "not-the-password" not in str(error)


def test_missing_table(tmp_path: Path, pg: PostgresService, image: str) -> None:
    error = failure(tmp_path, pg, image, table="public.nope")
    assert error.rule == "source"
    assert (
        f'table "public.nope" does not exist in database "{pg.database}" '
        f'(or user "{USER}" cannot see it)'
    ) in str(error)


def test_unsupported_type(tmp_path: Path, pg: PostgresService, image: str) -> None:
    error = failure(tmp_path, pg, image, table="periods")
    assert error.rule == "source"
    assert (
        'column "period" has type interval, which the postgres reader cannot read; '
        'cast it in a query, for example "period"::text'
    ) in str(error)


def test_host_not_granted(tmp_path: Path, pg: PostgresService, image: str) -> None:
    error = failure(tmp_path, pg, image, table="all_types", host="10.255.0.1")
    assert error.rule == "config"
    assert (
        "host:port 10.255.0.1:5432 is not granted; add it to the reader's network: "
        "[10.255.0.1:5432]"
    ) in str(error)


@pytest.mark.parametrize(
    ("query", "column", "value"),
    [
        ("SELECT 'infinity'::date AS d", "d", "infinity"),
        ("SELECT '-infinity'::timestamp AS ts", "ts", "-infinity"),
        ("SELECT 'NaN'::numeric(10,2) AS amount", "amount", "NaN"),
    ],
)
def test_unrepresentable_values_name_the_column(
    tmp_path: Path, pg: PostgresService, image: str, query: str, column: str, value: str
) -> None:
    error = failure(tmp_path, pg, image, query=query)
    assert error.rule == "source"
    assert f'column "{column}" holds {value}' in str(error)


def test_config_errors(tmp_path: Path, pg: PostgresService, image: str) -> None:
    error = failure(tmp_path / "a", pg, image, table="all_types", tabel="x")
    assert error.rule == "config"
    assert "unknown config key `tabel`; valid keys: application_name, columns" in str(error)
    error = failure(tmp_path / "b", pg, image, table="all_types", parallel={"workers": 2})
    assert error.rule == "config"
    assert "`parallel.workers` above 1 is not supported" in str(error)
    error = failure(tmp_path / "c", pg, image, query="SELEKT 1")
    assert error.rule == "source"
    assert "syntax error" in str(error)
    assert "in `query`" in str(error)
