"""The `files` reader: formats, globs, schemas, containment, incremental runs, streaming."""

from __future__ import annotations

import datetime as dt
import decimal
import gzip
import json
import os
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from dativo.connectors.files import FileReader, parse_arrow_type
from dativo.sdk import PluginConfigError, PluginContext, SourceError


@pytest.fixture
def indir(tmp_path: Path) -> Path:
    path = tmp_path / "in"
    path.mkdir()
    return path


def context(indir: Path, state: dict[str, Any] | None = None, **kw: Any) -> PluginContext:
    return PluginContext(run_id="run-1", role="reader", input_dir=indir, state=state, **kw)


def open_reader(indir: Path, config: dict[str, Any], **kw: Any) -> FileReader:
    reader = FileReader()
    reader.initialize(config, context(indir, **kw))
    return reader


def read_all(reader: FileReader, batch_size: int = 1000) -> pa.Table:
    schema = reader.get_schema()
    batches = list(reader.read_batch(batch_size))
    for batch in batches:
        assert batch.schema.equals(schema)
    return pa.Table.from_batches(batches, schema=schema)


def read(indir: Path, config: dict[str, Any], batch_size: int = 1000) -> pa.Table:
    return read_all(open_reader(indir, config), batch_size)


def write_csv(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(table, path)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def small(n: int = 3, start: int = 0) -> pa.Table:
    ids = list(range(start, start + n))
    return pa.table({"id": ids, "name": [f"n{i}" for i in ids], "x": [i / 2 for i in ids]})


TYPED = pa.table(
    {
        "i": pa.array([1, None, -5], pa.int32()),
        "f": pa.array([0.1, 1e300, None]),
        "s": pa.array(["a,b", "", None]),
        "b": pa.array([True, None, False]),
        "d": pa.array([dt.date(2020, 1, 1), None, dt.date(1999, 12, 31)]),
        "ts": pa.array(
            [dt.datetime(2020, 1, 1, 1, 2, 3, 456789), None, dt.datetime(1970, 1, 1)],
            pa.timestamp("us"),
        ),
        "tz": pa.array(
            [dt.datetime(2020, 1, 1, 1, 2, 3, tzinfo=dt.UTC), None, None],
            pa.timestamp("us", "UTC"),
        ),
        "dec": pa.array(
            [decimal.Decimal("1.23"), decimal.Decimal("-99.99"), None], pa.decimal128(18, 2)
        ),
    }
)
TYPED_SCHEMA = {
    "i": "int32",
    "f": "float64",
    "s": "string",
    "b": "bool",
    "d": "date32",
    "ts": "timestamp[us]",
    "tz": "timestamp[us, UTC]",
    "dec": "decimal128(18,2)",
}


# -- formats ------------------------------------------------------------------------------------


def test_csv_round_trip_with_declared_schema(indir: Path) -> None:
    write_csv(indir / "t.csv", TYPED)
    assert read(indir, {"paths": ["t.csv"], "schema": TYPED_SCHEMA}).equals(TYPED)


def test_csv_round_trip_inferred(indir: Path) -> None:
    table = small(50)
    write_csv(indir / "a.csv", table)
    assert read(indir, {"paths": ["*.csv"]}).equals(table)


def test_jsonl_round_trip_with_declared_schema(indir: Path) -> None:
    write_jsonl(
        indir / "t.jsonl",
        [
            {
                "i": 1,
                "f": 0.1,
                "s": "a,b",
                "b": True,
                "d": "2020-01-01",
                "ts": "2020-01-01 01:02:03.456789",
                "tz": "2020-01-01T01:02:03Z",
                "dec": "1.23",
            },
            {"i": None, "f": 1e300, "s": "", "b": None, "dec": -99.99, "extra": [1, 2]},
            {"i": -5, "s": None, "b": False, "d": "1999-12-31", "ts": "1970-01-01T00:00:00"},
        ],
    )
    assert read(indir, {"paths": ["t.jsonl"], "schema": TYPED_SCHEMA}).equals(TYPED)


def test_jsonl_inferred_and_compressed(indir: Path) -> None:
    rows = [{"id": i, "name": f"n{i}", "x": i / 2} for i in range(10)]
    with gzip.open(indir / "a.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    assert read(indir, {"paths": ["*.jsonl.gz"]}).to_pylist() == rows


def test_parquet_round_trip_and_dictionaries_decoded(indir: Path) -> None:
    table = TYPED.append_column("cat", pa.array(["x", "y", "x"]).dictionary_encode())
    pq.write_table(table, indir / "t.parquet", row_group_size=2)
    got = read(indir, {"paths": ["t.parquet"]})
    assert got.schema.field("cat").type == pa.string()
    assert got.equals(table.set_column(8, "cat", pa.array(["x", "y", "x"])))


def test_parquet_declared_schema_selects_and_casts(indir: Path) -> None:
    pq.write_table(small(5), indir / "t.parquet")
    got = read(indir, {"paths": ["t.parquet"], "schema": {"x": "float32", "id": "int16"}})
    assert got.schema == pa.schema([("x", pa.float32()), ("id", pa.int16())])
    assert got.column("id").to_pylist() == [0, 1, 2, 3, 4]


def test_csv_options(indir: Path) -> None:
    (indir / "a.csv").write_text("1;'x;y';NULL\n2;'z';3.5\n")
    got = read(
        indir,
        {
            "paths": ["a.csv"],
            "schema": {"id": "int64", "name": "string", "v": "float64"},
            "csv": {"delimiter": ";", "header": False, "quote_char": "'", "null_values": ["NULL"]},
        },
    )
    assert got.to_pylist() == [
        {"id": 1, "name": "x;y", "v": None},
        {"id": 2, "name": "z", "v": 3.5},
    ]


def test_csv_without_header_inferred_names(indir: Path) -> None:
    (indir / "a.csv").write_text("1,x\n2,y\n")
    got = read(indir, {"paths": ["a.csv"], "csv": {"header": False}})
    assert got.column_names == ["f0", "f1"]
    assert got.num_rows == 2


def test_get_schema_before_read(indir: Path) -> None:
    write_csv(indir / "a.csv", small())
    reader = open_reader(indir, {"paths": ["a.csv"]})
    assert reader.get_schema() == small().schema


# -- globs and formats -------------------------------------------------------------------------


def test_globs_with_double_star_sorted(indir: Path) -> None:
    for rel in ["x.csv", "a/b/c.csv", "a/d.csv", "a/.hidden.csv", ".h/e.csv", "a/b/skip.txt"]:
        write_csv(indir / rel, small(1, start=len(rel)))
    reader = open_reader(indir, {"paths": ["**/*.csv"]})
    assert [s.rel for s in reader._todo] == ["a/b/c.csv", "a/d.csv", "x.csv"]
    reader = open_reader(indir, {"paths": ["a/**/*.csv", "a/*.csv"], "format": "csv"})
    assert [s.rel for s in reader._todo] == ["a/b/c.csv", "a/d.csv"]
    reader = open_reader(indir, {"paths": "a/*/c.[cx]sv"})
    assert [s.rel for s in reader._todo] == ["a/b/c.csv"]
    assert read_all(open_reader(indir, {"paths": ["**"], "format": "csv"})).num_rows == 4


def test_no_match_is_an_error_naming_the_pattern(indir: Path) -> None:
    write_csv(indir / "a.csv", small())
    with pytest.raises(SourceError, match=r"`orders/\*\.csv` matched no file"):
        open_reader(indir, {"paths": ["a.csv", "orders/*.csv"]})


def test_mixed_and_unknown_formats_refused(indir: Path) -> None:
    write_csv(indir / "a.csv", small())
    pq.write_table(small(), indir / "b.parquet")
    (indir / "c.txt").write_text("x")
    with pytest.raises(PluginConfigError, match="several formats"):
        open_reader(indir, {"paths": ["*.csv", "*.parquet"]})
    with pytest.raises(PluginConfigError, match=r"c\.txt.*`format: csv`"):
        open_reader(indir, {"paths": ["*.txt"]})


@pytest.mark.parametrize("pattern", ["../x.csv", "/etc/passwd", "a/../../x.csv", "C:/x.csv"])
def test_patterns_escaping_input_dir_refused(indir: Path, pattern: str) -> None:
    with pytest.raises(PluginConfigError, match=r"`paths`: ") as err:
        open_reader(indir, {"paths": [pattern]})
    assert "input directory" in str(err.value)


def test_symlink_to_outside_refused(tmp_path: Path, indir: Path) -> None:
    outside = tmp_path / "secret"
    outside.mkdir()
    write_csv(outside / "s.csv", small())
    write_csv(indir / "ok.csv", small())
    (indir / "link.csv").symlink_to(outside / "s.csv")
    with pytest.raises(SourceError, match=r"`link\.csv` is a symbolic link .* outside"):
        open_reader(indir, {"paths": ["*.csv"]})
    with pytest.raises(SourceError, match="outside"):
        open_reader(indir, {"paths": ["link.csv"]})


def test_symlinked_directory_to_outside(tmp_path: Path, indir: Path) -> None:
    outside = tmp_path / "secret"
    outside.mkdir()
    write_csv(outside / "s.csv", small())
    write_csv(indir / "ok.csv", small())
    (indir / "dir").symlink_to(outside)
    with pytest.raises(SourceError, match=r"`dir` is a symbolic link"):
        open_reader(indir, {"paths": ["dir/*.csv"]})
    # Wildcards never descend into a linked directory.
    reader = open_reader(indir, {"paths": ["**/*.csv"]})
    assert [s.rel for s in reader._todo] == ["ok.csv"]


def test_symlink_inside_input_dir_is_read(indir: Path) -> None:
    write_csv(indir / "data/a.csv", small())
    (indir / "alias.csv").symlink_to(indir / "data/a.csv")
    assert read(indir, {"paths": ["alias.csv"]}).equals(small())


# -- schemas -----------------------------------------------------------------------------------


def test_declared_schema_casts_and_drops_other_columns(indir: Path) -> None:
    (indir / "a.csv").write_text("id,amount,skip\n1,2.50,x\n2,,y\n")
    got = read(indir, {"paths": ["a.csv"], "schema": {"amount": "decimal128(10,2)", "id": "int8"}})
    assert got.schema == pa.schema([("amount", pa.decimal128(10, 2)), ("id", pa.int8())])
    assert got.column("amount").to_pylist() == [decimal.Decimal("2.50"), None]


def test_declared_column_missing_is_a_clear_error(indir: Path) -> None:
    (indir / "a.csv").write_text("id\n1\n")
    with pytest.raises(SourceError, match=r"a\.csv: column\(s\) `qty` missing"):
        read(indir, {"paths": ["a.csv"], "schema": {"id": "int64", "qty": "int64"}})
    write_jsonl(indir / "b.jsonl", [{"id": 1}])
    got = read(indir, {"paths": ["b.jsonl"], "schema": {"id": "int64", "qty": "int64"}})
    assert got.column("qty").to_pylist() == [None]  # JSON lines: an absent key is a null


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_value_not_castable_names_file_column_type(indir: Path, fmt: str) -> None:
    table = pa.table({"id": ["1", "2", "oops"]})
    if fmt == "csv":
        write_csv(indir / "a.csv", table)
    elif fmt == "jsonl":
        write_jsonl(indir / "a.jsonl", table.to_pylist())
    else:
        pq.write_table(table, indir / "a.parquet")
    with pytest.raises(SourceError) as err:
        read(indir, {"paths": [f"a.{fmt}"], "schema": {"id": "int64"}})
    text = str(err.value)
    assert f"a.{fmt}" in text
    assert "column `id` cannot be read as int64" in text


def test_inferred_schema_mismatch_between_files(indir: Path) -> None:
    write_csv(indir / "a.csv", small())
    write_csv(indir / "b.csv", small().drop_columns(["x"]))
    with pytest.raises(SourceError, match=r"b\.csv: column\(s\) `x` missing"):
        read(indir, {"paths": ["*.csv"]})
    (indir / "b.csv").write_text("id,name,x,more\n1,a,1.0,2\n")
    with pytest.raises(SourceError, match=r"b\.csv: extra column\(s\) `more`"):
        read(indir, {"paths": ["*.csv"]})
    (indir / "b.csv").write_text("id,name,x\nabc,a,1.0\n")
    with pytest.raises(SourceError, match=r"b\.csv: column `id` cannot be read as int64"):
        read(indir, {"paths": ["*.csv"]})


def test_inferred_schema_later_csv_read_with_first_types(indir: Path) -> None:
    write_csv(indir / "a.csv", small())
    (indir / "b.csv").write_text("x,id,name\n7,5,\n")  # other order; int where float
    got = read(indir, {"paths": ["*.csv"]})
    assert got.schema == small().schema
    assert got.slice(3).to_pylist() == [{"id": 5, "name": None, "x": 7.0}]


def test_inferred_parquet_safe_cast_and_mismatch(indir: Path) -> None:
    pq.write_table(pa.table({"a": pa.array([1], pa.int64()), "b": ["x"]}), indir / "1.parquet")
    pq.write_table(pa.table({"b": ["y"], "a": pa.array([2], pa.int16())}), indir / "2.parquet")
    got = read(indir, {"paths": ["*.parquet"]})
    assert got.to_pylist() == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
    pq.write_table(pa.table({"a": ["3"], "b": ["z"]}), indir / "3.parquet")
    with pytest.raises(SourceError, match=r"3\.parquet: .*`a` is string here but int64"):
        read(indir, {"paths": ["*.parquet"]})


def test_jsonl_unexpected_field_in_later_file(indir: Path) -> None:
    write_jsonl(indir / "a.jsonl", [{"id": 1}])
    write_jsonl(indir / "b.jsonl", [{"id": 2, "new": "x"}])
    with pytest.raises(SourceError, match=r"b\.jsonl.*not in the schema"):
        read(indir, {"paths": ["*.jsonl"]})


def test_type_strings() -> None:
    assert parse_arrow_type("timestamp[us, UTC]") == pa.timestamp("us", "UTC")
    assert parse_arrow_type(" decimal128(18, 2) ") == pa.decimal128(18, 2)
    assert parse_arrow_type("decimal(40,2)") == pa.decimal256(40, 2)
    assert parse_arrow_type("Int64") == pa.int64()
    assert parse_arrow_type("time64[ns]") == pa.time64("ns")
    for bad in ["int", "timestamp[xs]", "decimal128(2,3)", "decimal128(39,1)", "time32[s, UTC]"]:
        with pytest.raises(ValueError, match=re.escape(bad)):
            parse_arrow_type(bad)


def test_config_errors_are_readable(indir: Path) -> None:
    with pytest.raises(PluginConfigError) as err:
        open_reader(indir, {"paths": ["*.csv"], "schema": {"a": "integer"}, "colour": 1})
    text = str(err.value)
    assert "unknown key `colour`" in text
    assert "`schema`: column `a`: unknown type `integer`" in text
    assert "int64" in text  # lists the valid types
    assert "valid keys: paths, format, schema, csv, incremental, block_size" in text
    with pytest.raises(PluginConfigError, match=r"unknown key `csv.sep`; valid keys here"):
        open_reader(indir, {"paths": ["*.csv"], "csv": {"sep": ";"}})
    with pytest.raises(PluginConfigError, match="`paths` is required"):
        open_reader(indir, {})
    with pytest.raises(PluginConfigError, match="no input directory"):
        FileReader().initialize({"paths": ["*"]}, PluginContext(run_id="r", role="reader"))


# -- incremental -------------------------------------------------------------------------------


def test_incremental_skips_unchanged_and_rereads_changed(indir: Path) -> None:
    write_csv(indir / "a.csv", small(3))
    write_csv(indir / "b.csv", small(3, start=10))
    config = {"paths": ["*.csv"], "incremental": True}
    checkpoints: list[dict[str, Any]] = []

    first = open_reader(indir, config, checkpoint=checkpoints.append)
    assert read_all(first).num_rows == 6
    state = first.get_incremental_state()
    assert state is not None
    assert set(state["files"]) == {"a.csv", "b.csv"}
    assert state["files"]["a.csv"]["size"] == (indir / "a.csv").stat().st_size
    assert checkpoints[-1] == state

    second = open_reader(indir, config, state=state)
    assert list(second.read_batch(100)) == []  # all read before: nothing, no error
    assert second.get_schema() == small().schema
    assert second.get_incremental_state() == state

    write_csv(indir / "b.csv", small(4, start=20))  # size changes
    write_csv(indir / "c.csv", small(1, start=30))
    third = open_reader(indir, config, state=state)
    assert read_all(third).column("id").to_pylist() == [20, 21, 22, 23, 30]
    new_state = third.get_incremental_state()
    assert new_state is not None
    assert set(new_state["files"]) == {"a.csv", "b.csv", "c.csv"}
    assert new_state["files"]["a.csv"] == state["files"]["a.csv"]

    os.utime(indir / "a.csv", ns=(1, 1))  # only the mtime changes
    fourth = open_reader(indir, config, state=new_state)
    assert read_all(fourth).column("id").to_pylist() == [0, 1, 2]


def test_not_incremental_has_no_state(indir: Path) -> None:
    write_csv(indir / "a.csv", small())
    reader = open_reader(indir, {"paths": ["a.csv"]}, state={"files": {"a.csv": {}}})
    assert read_all(reader).num_rows == 3
    assert reader.get_incremental_state() is None


def test_malformed_state_refused(indir: Path) -> None:
    write_csv(indir / "a.csv", small())
    with pytest.raises(SourceError, match="incremental state"):
        open_reader(indir, {"paths": ["a.csv"], "incremental": True}, state={"files": [1]})


def test_checkpoint_only_covers_files_fully_yielded(indir: Path) -> None:
    for i in range(3):
        write_csv(indir / f"{i}.csv", small(5, start=i * 5))
    seen: list[dict[str, Any]] = []
    reader = open_reader(indir, {"paths": ["*.csv"], "incremental": True}, checkpoint=seen.append)
    batches = reader.read_batch(4)
    next(batches)  # rows 0-3
    next(batches)  # rows 4-7: the last row of 0.csv is yielded, not yet known to be written
    assert seen == []
    next(batches)  # asking for more means rows 4-7 were written: 0.csv is done
    assert set(seen[-1]["files"]) == {"0.csv"}
    list(batches)
    assert set(seen[-1]["files"]) == {"0.csv", "1.csv", "2.csv"}


# -- batching and streaming --------------------------------------------------------------------


def test_batches_respect_batch_size_across_files(indir: Path) -> None:
    for i in range(5):
        write_csv(indir / f"{i}.csv", small(300, start=i * 300))
    pq.write_table(small(1500), indir / "all.parquet", row_group_size=700)
    for pattern in ["*.csv", "*.parquet"]:
        batches = list(open_reader(indir, {"paths": [pattern]}).read_batch(400))
        assert [b.num_rows for b in batches] == [400, 400, 400, 300]
        got = pa.Table.from_batches(batches)
        assert got.column("id").to_pylist() == list(range(1500))


def test_large_csv_is_streamed(indir: Path) -> None:
    rows = 200_000
    table = pa.table(
        {
            "id": pa.array(range(rows), pa.int64()),
            "name": pa.array([f"name-{i % 977}" for i in range(rows)]),
            "v": pa.array([i * 0.25 for i in range(rows)]),
        }
    )
    write_csv(indir / "big.csv", table)
    size = (indir / "big.csv").stat().st_size
    # Arrow reads up to 32 blocks ahead: memory is bounded by the block size, not the file.
    reader = open_reader(indir, {"paths": ["big.csv"], "block_size": "16KiB"})
    reader.get_schema()
    base = pa.total_allocated_bytes()
    peak = 0
    count = 0
    total = 0
    for batch in reader.read_batch(5000):
        peak = max(peak, pa.total_allocated_bytes() - base)
        count += 1
        total += batch.num_rows
        assert batch.num_rows <= 5000
    assert total == rows
    assert count == rows // 5000
    assert peak < size / 3, (peak, size)  # never the whole file at once
