"""The `postgres` reader's planning: config checks, type mapping and the SQL it issues.

Reading from a real server is tested in tests/integration/test_postgres.py.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from dativo.connectors.postgres import (
    Column,
    PostgresConfig,
    PostgresReader,
    arrow_type_for,
    describe,
    numeric_type,
    qualified_table,
    quote_literal,
    source_sql,
)
from dativo.sdk import NetworkDestination, PluginConfigError, PluginContext, SourceError

BASE = {"host": "db.example.com", "database": "shop", "user": "loader"}


def typmod(precision: int, scale: int) -> int:
    return ((precision << 16) | (scale & 0x7FF)) + 4


@pytest.mark.parametrize(
    ("mod", "expected"),
    [
        (typmod(12, 2), pa.decimal128(12, 2)),
        (typmod(38, 38), pa.decimal128(38, 38)),
        (typmod(39, 2), pa.string()),
        (typmod(5, -2), pa.string()),  # PostgreSQL 15 allows a negative scale
        (typmod(3, 5), pa.string()),  # ... and a scale above the precision
        (-1, pa.string()),
    ],
)
def test_numeric_modifiers(mod: int, expected: pa.DataType) -> None:
    assert numeric_type(mod) == expected


def test_type_table() -> None:
    assert arrow_type_for("int2", -1) == pa.int16()
    assert arrow_type_for("timestamptz", -1) == pa.timestamp("us", tz="UTC")
    assert arrow_type_for("uuid", -1) == pa.string()
    assert arrow_type_for("_numeric", typmod(6, 2)) == pa.list_(pa.decimal128(6, 2))
    assert arrow_type_for("_jsonb", -1) == pa.list_(pa.string())
    for unsupported in ("interval", "timetz", "inet", "money", "_interval", "mood"):
        assert arrow_type_for(unsupported, -1) is None


def field(name: str, typname: str, mod: int = -1) -> pa.Field:
    meta = {"POSTGRESQL:type": typname}
    if mod != -1:
        meta["POSTGRESQL:typmod"] = str(mod)
    return pa.field(name, pa.string(), metadata=meta)


def test_describe_refuses_duplicates_and_unsupported_types() -> None:
    with pytest.raises(SourceError, match='two columns named "a"; alias one'):
        describe(pa.schema([field("a", "int4"), field("a", "text")]))
    with pytest.raises(SourceError) as caught:
        describe(pa.schema([field("period", "interval")]))
    assert 'column "period" has type interval' in str(caught.value)
    assert '"period"::text' in str(caught.value)
    with pytest.raises(SourceError, match=r"has type interval\[\]"):
        describe(pa.schema([field("ps", "_interval")]))
    columns = describe(
        pa.schema([field("n", "numeric", typmod(9, 3)), field("ns", "_numeric")]),
        {"ns": typmod(4, 1)},
    )
    assert [c.arrow for c in columns] == [pa.decimal128(9, 3), pa.list_(pa.decimal128(4, 1))]


def test_sql_quoting() -> None:
    assert qualified_table("public.orders") == '"public"."orders"'
    assert qualified_table('we"ird') == '"we""ird"'
    assert qualified_table("a.b.c") == '"a"."b.c"'
    assert quote_literal("it's") == "'it''s'"
    assert quote_literal("a\\'b") == " E'a\\\\''b'"
    with pytest.raises(PluginConfigError):
        quote_literal("a\x00b")
    config = PostgresConfig(**BASE, table="orders", columns=["id", "Amount"])
    assert source_sql(config) == '(SELECT "id", "Amount" FROM "orders")'
    assert source_sql(config, "ctid >= '(0,0)'::tid") == (
        '(SELECT "id", "Amount" FROM "orders" WHERE ctid >= \'(0,0)\'::tid)'
    )
    assert source_sql(PostgresConfig(**BASE, query="SELECT 1;\n")) == "(SELECT 1)"
    assert Column("u", "uuid", -1, pa.string()).select == 'dativo_src."u"::text AS "u"'
    assert Column("us", "_uuid", -1, pa.string()).select == 'dativo_src."us"::text[] AS "us"'


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "give exactly one of `table` and `query`"),
        ({"table": "t", "query": "SELECT 1"}, "give exactly one of `table` and `query`"),
        ({"query": "  "}, "`query` is empty"),
        ({"query": "SELECT 1", "columns": ["a"]}, "`columns` goes with `table`"),
        ({"query": "SELECT 1", "parallel": {"workers": 2}}, "`parallel` reads a `table`"),
        ({"table": "t", "sslmode": "verify-full"}, "`sslmode`"),
        ({"table": "t", "port": 0}, "`port`"),
        ({"table": "t", "parallel": {"workers": 17}}, "`parallel.workers`"),
        ({"table": "t", "incremental": {"column": "c", "mode": "after"}}, "`incremental.mode`"),
        ({"table": "t", "tabel": "x"}, "unknown key `tabel`"),
    ],
)
def test_config_errors(config: dict[str, object], message: str) -> None:
    reader = PostgresReader()
    context = PluginContext(run_id="r", role="reader")
    with pytest.raises(PluginConfigError) as caught:
        reader.initialize({**BASE, **config}, context)
    assert message in str(caught.value)


def test_host_must_be_granted() -> None:
    reader = PostgresReader()
    grant = NetworkDestination("db.example.com:6432", "127.0.0.2", 6432, "/run/x/.s.PGSQL.6432")
    context = PluginContext(run_id="r", role="reader", network={"db.example.com:6432": grant})
    with pytest.raises(PluginConfigError) as caught:
        reader.initialize({**BASE, "table": "t"}, context)
    assert "db.example.com:5432 is not granted (granted: db.example.com:6432)" in str(caught.value)
    assert "network: [db.example.com:5432]" in str(caught.value)


def test_connection_string_uses_socket_only_without_tls() -> None:
    grant = NetworkDestination(
        "db.example.com:5432", "127.0.0.2", 5432, "/run/dativo/net/db.example.com/.s.PGSQL.5432"
    )
    context = PluginContext(run_id="r", role="reader", network={"db.example.com:5432": grant})
    plain = PostgresConfig(**BASE, table="t", sslmode="disable", password="it's")
    text, where = PostgresReader._connection_string(plain, context)
    assert "host='/run/dativo/net/db.example.com'" in text
    assert "password='it\\'s'" in text
    assert where == "its granted Unix socket"
    tls = PostgresConfig(**BASE, table="t")
    text, where = PostgresReader._connection_string(tls, context)
    # TLS through the relay, verified against the real name.
    assert "host='db.example.com'" in text
    assert "hostaddr='127.0.0.2'" in text
    assert "sslmode='prefer'" in text


def test_unsandboxed_connection_names_the_host_alone() -> None:
    """In the in-process mode the grant's host is the database's own name: no `hostaddr` (it
    takes only addresses), whatever the case the job wrote the name in."""
    grant = NetworkDestination("db.example.com:5432", "db.example.com", 5432)
    context = PluginContext(run_id="r", role="reader", network={"db.example.com:5432": grant})
    config = PostgresConfig(**{**BASE, "host": "DB.example.com"}, table="t")
    text, where = PostgresReader._connection_string(config, context)
    assert "hostaddr" not in text
    assert where == "TCP db.example.com:5432"
