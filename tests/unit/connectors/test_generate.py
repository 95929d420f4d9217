"""The `generate` reader: determinism, the type mix, repeat mode and the CSV round trip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from dativo.connectors.files import FileReader
from dativo.connectors.generate import (
    GenerateReader,
    csv_schema,
    generate_csv,
    generate_schema,
    generate_table,
)
from dativo.sdk import PluginConfigError, PluginContext

CTX = PluginContext(run_id="run-1", role="reader")


def reader(config: dict[str, Any]) -> GenerateReader:
    r = GenerateReader()
    r.initialize(config, CTX)
    return r


def read(config: dict[str, Any], batch_size: int) -> tuple[pa.Table, list[int]]:
    r = reader(config)
    batches = list(r.read_batch(batch_size))
    for batch in batches:
        assert batch.schema.equals(r.get_schema())
    return pa.Table.from_batches(batches, schema=r.get_schema()), [b.num_rows for b in batches]


def test_deterministic_and_equal_to_generate_table() -> None:
    config = {"rows": 2500, "columns": 20, "seed": 7}
    a, sizes = read(config, 1000)
    assert sizes == [1000, 1000, 500]
    b, _ = read(config, 333)
    expected = generate_table(2500, 20, seed=7)
    assert a.equals(expected)
    assert b.equals(expected)  # values depend on the row index only, not on batching
    c, _ = read({**config, "seed": 8}, 1000)
    assert not c.equals(expected)
    assert c.column("id").equals(expected.column("id"))


def test_type_mix_ids_and_nulls() -> None:
    table = generate_table(20_000, 17, seed=1)
    assert table.schema == generate_schema(17)
    assert table.schema.types[:9] == [
        pa.int64(),
        pa.int32(),
        pa.float64(),
        pa.string(),
        pa.bool_(),
        pa.timestamp("us"),
        pa.date32(),
        pa.decimal128(12, 2),
        pa.int64(),
    ]
    assert table.column_names[:4] == ["id", "int32_1", "float64_2", "string_3"]
    assert table.column("id").to_pylist() == list(range(20_000))
    for name in table.column_names[1:]:
        share = table.column(name).null_count / table.num_rows
        assert 0.03 < share < 0.07, (name, share)
        assert pc.count_distinct(table.column(name)).as_py() > 1
    lengths = pc.utf8_length(table.column("string_3"))
    assert pc.min(lengths).as_py() == 5
    assert pc.max(lengths).as_py() == 30
    assert pc.count_distinct(table.column("bool_4")).as_py() == 2


def test_repeat_batch() -> None:
    r = reader({"rows": 2500, "columns": 3, "repeat_batch": True})
    batches = list(r.read_batch(1000))
    assert [b.num_rows for b in batches] == [1000, 1000, 500]
    assert batches[0] is batches[1]
    assert batches[2].equals(batches[0].slice(0, 500))


def test_zero_rows_and_one_column() -> None:
    assert read({"rows": 0}, 10)[1] == []
    table, _ = read({"rows": 5, "columns": 1}, 10)
    assert table.column_names == ["id"]


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"rows": 1, "columns": 0}, "`columns`"),
        ({"rows": 1, "columns": 1001}, "`columns`"),
        ({"rows": -1}, "`rows`"),
        ({}, "`rows` is required"),
        ({"rows": 1, "colums": 3}, "unknown key `colums`"),
    ],
)
def test_config_errors(config: dict[str, Any], fragment: str) -> None:
    with pytest.raises(PluginConfigError, match=fragment):
        reader(config)


def test_csv_round_trip_through_file_reader(tmp_path: Path) -> None:
    generate_csv(tmp_path / "gen.csv", 3000, 24, seed=5)
    expected = generate_table(3000, 24, seed=5)
    ctx = PluginContext(run_id="r", role="reader", input_dir=tmp_path)

    declared = FileReader()
    declared.initialize({"paths": ["gen.csv"], "schema": csv_schema(24)}, ctx)
    got = pa.Table.from_batches(list(declared.read_batch(1000)), schema=declared.get_schema())
    assert got.equals(expected)

    # Inferred: int32 -> int64, timestamp[us] -> timestamp[ns], decimal -> float64; the values
    # still cast back exactly.
    inferred = FileReader()
    inferred.initialize({"paths": ["gen.csv"]}, ctx)
    schema = inferred.get_schema()
    assert schema.field("int32_1").type == pa.int64()
    assert schema.field("timestamp_5").type == pa.timestamp("ns")
    assert schema.field("decimal_7").type == pa.float64()
    got = pa.Table.from_batches(list(inferred.read_batch(1000)), schema=schema)
    assert got.cast(expected.schema).equals(expected)
