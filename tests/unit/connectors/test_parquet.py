"""The `parquet` writer: round trip, rolling, partitions, atomic names, abort, containment."""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from dativo.connectors.generate import generate_table
from dativo.connectors.parquet import ParquetWriter
from dativo.sdk import PluginConfigError, PluginContext, SourceError, WriteResult

RUN_ID = "0123456789abcdef-run"


@pytest.fixture
def outdir(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


def make_writer(outdir: Path, config: dict[str, Any], schema: pa.Schema) -> ParquetWriter:
    writer = ParquetWriter()
    writer.initialize(config, PluginContext(run_id=RUN_ID, role="writer", output_dir=outdir))
    writer.open(schema)
    return writer


def write(outdir: Path, config: dict[str, Any], table: pa.Table, rows: int = 1000) -> WriteResult:
    writer = make_writer(outdir, config, table.schema)
    for batch in table.to_batches(max_chunksize=rows):
        writer.write_batch(batch)
    result = writer.finalize()
    writer.close()
    return result


def all_files(outdir: Path) -> list[str]:
    return sorted(
        str(p.relative_to(outdir)) for p in outdir.rglob("*") if p.is_file() or p.is_symlink()
    )


def read_back(outdir: Path, result: WriteResult) -> pa.Table:
    return pa.concat_tables(pq.read_table(outdir / f.path) for f in result.files)


def test_round_trip(outdir: Path) -> None:
    table = generate_table(5000, 16, seed=3)
    result = write(outdir, {}, table)
    assert [f.path for f in result.files] == ["part-0123456789abcdef-run-00001.parquet"]
    assert result.metadata == {"format": "parquet", "compression": "zstd"}
    assert result.rows == 5000
    assert read_back(outdir, result).equals(table)
    only = result.files[0]
    assert only.bytes == (outdir / only.path).stat().st_size
    assert only.partition == {}
    assert all_files(outdir) == [only.path]  # no temporary names left


@pytest.mark.parametrize("compression", ["snappy", "gzip", "none"])
def test_compressions(outdir: Path, compression: str) -> None:
    table = generate_table(100, 8)
    result = write(outdir, {"compression": compression}, table)
    assert read_back(outdir, result).equals(table)
    meta = pq.ParquetFile(outdir / result.files[0].path).metadata
    expected = "UNCOMPRESSED" if compression == "none" else compression.upper()
    assert meta.row_group(0).column(0).compression == expected


def test_files_roll_at_target_size(outdir: Path) -> None:
    table = generate_table(20_000, 8, seed=1)
    result = write(outdir, {"target_file_size": "64KiB", "file_prefix": "orders"}, table, rows=2000)
    assert len(result.files) > 3
    names = [f.path for f in result.files]
    assert names == [
        f"orders-0123456789abcdef-run-{i:05d}.parquet" for i in range(1, len(names) + 1)
    ]
    assert sum(f.rows for f in result.files) == 20_000
    for f in result.files:
        assert f.bytes == (outdir / f.path).stat().st_size
        assert pq.ParquetFile(outdir / f.path).metadata.num_rows == f.rows
    assert read_back(outdir, result).equals(table)
    assert all_files(outdir) == names


def test_row_groups_buffer_small_batches(outdir: Path) -> None:
    table = generate_table(10_000, 4)
    result = write(outdir, {"row_group_size": 4000}, table, rows=100)
    meta = pq.ParquetFile(outdir / result.files[0].path).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [4000, 4000, 2000]


def test_partitioning_layout_and_values(outdir: Path) -> None:
    table = pa.table(
        {
            "country": ["fr", "de", None, "a/b", "..", "fr", "", "__null__"],
            "day": pa.array([dt.date(2024, 1, d) for d in [1, 1, 2, 2, 3, 1, 4, 4]]),
            "v": list(range(8)),
        }
    )
    result = write(outdir, {"partition_by": ["country", "day"]}, table, rows=3)
    paths = {f.path.rsplit("/", 1)[0]: f for f in result.files}
    assert sorted(paths) == [
        "country=%2E./day=2024-01-03",
        "country=%5F_null__/day=2024-01-04",
        "country=__empty__/day=2024-01-04",
        "country=__null__/day=2024-01-02",
        "country=a%2Fb/day=2024-01-02",
        "country=de/day=2024-01-01",
        "country=fr/day=2024-01-01",
    ]
    fr = paths["country=fr/day=2024-01-01"]
    assert fr.partition == {"country": "fr", "day": "2024-01-01"}
    assert fr.rows == 2
    assert paths["country=__null__/day=2024-01-02"].partition["country"] == "__null__"
    assert paths["country=a%2Fb/day=2024-01-02"].partition["country"] == "a/b"
    # The partition columns live in the directory names, not in the files.
    assert pq.read_table(outdir / fr.path).to_pylist() == [{"v": 0}, {"v": 5}]
    assert all(not name.startswith(".") for name in all_files(outdir))
    # A hive-aware reader gets the values back.
    got = ds.dataset(outdir, format="parquet", partitioning="hive").to_table()
    rows = {(r["country"], str(r["day"])): r["v"] for r in got.to_pylist()}
    assert rows[("fr", "2024-01-01")] in (0, 5)
    assert rows[("a/b", "2024-01-02")] == 3


def test_partition_segments_are_safe_for_the_supervisor(outdir: Path) -> None:
    safe = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=%+,@-]{0,254}")  # supervisor's rule
    values = ["~home", "a b:c", "é/ü", "x" * 300, "%" * 150, ".hidden"]
    table = pa.table({"Order Date": values, "v": list(range(len(values)))})
    result = write(outdir, {"partition_by": ["Order Date"]}, table)
    assert len(result.files) == len(values)
    for f in result.files:
        for part in f.path.split("/"):
            assert safe.fullmatch(part), part
    got = ds.dataset(outdir, format="parquet", partitioning="hive").to_table()
    decoded = set(got.column("Order Date").to_pylist())
    assert {"~home", "a b:c", "é/ü", ".hidden"} <= decoded  # hive readers decode them back
    # Values too long for a directory name are shortened, with a hash to keep them apart.
    assert any(v.startswith("x" * 150) and v != "x" * 300 for v in decoded)
    assert any(v.startswith("%" * 50) and v != "%" * 150 for v in decoded)
    with pytest.raises(PluginConfigError, match="must start with a letter"):
        make_writer(
            outdir, {"partition_by": ["-k"]}, pa.schema([("-k", pa.int8()), ("v", pa.int8())])
        )


def test_partition_column_missing_is_a_config_error(outdir: Path) -> None:
    writer = ParquetWriter()
    writer.initialize(
        {"partition_by": ["nope"]}, PluginContext(RUN_ID, "writer", output_dir=outdir)
    )
    with pytest.raises(PluginConfigError, match=r"`nope` that the data does not have.*`v`"):
        writer.open(pa.schema([("v", pa.int64())]))
    with pytest.raises(PluginConfigError, match="every column"):
        make_writer(outdir, {"partition_by": "v"}, pa.schema([("v", pa.int64())]))


def test_too_many_partitions(outdir: Path) -> None:
    table = pa.table({"k": list(range(10)), "v": list(range(10))})
    writer = make_writer(outdir, {"partition_by": ["k"], "max_open_partitions": 4}, table.schema)
    with pytest.raises(SourceError, match=r"more than 4 distinct values.*max_open_partitions"):
        writer.write_batch(table.to_batches()[0])
    writer.abort()
    assert all_files(outdir) == []


def test_crash_leaves_only_hidden_tmp_names_and_abort_removes_all(outdir: Path) -> None:
    table = generate_table(20_000, 6)
    writer = make_writer(
        outdir, {"target_file_size": "32KiB", "partition_by": ["bool_4"]}, table.schema
    )
    for batch in table.to_batches(max_chunksize=1000):
        writer.write_batch(batch)
    names = all_files(outdir)
    assert names
    unfinished = [n for n in names if n.endswith(".tmp")]
    assert unfinished
    assert all(Path(n).name.startswith(".") for n in unfinished)
    writer.abort()
    writer.close()
    assert list(outdir.iterdir()) == []  # files and partition directories gone


def test_close_without_finalize_cleans_up(outdir: Path) -> None:
    table = generate_table(100, 3)
    writer = make_writer(outdir, {}, table.schema)
    writer.write_batch(table.to_batches()[0])
    writer.close()
    assert list(outdir.iterdir()) == []


def test_empty_stream_writes_nothing(outdir: Path) -> None:
    result = write(outdir, {}, generate_table(0, 3))
    assert result.files == []
    assert list(outdir.iterdir()) == []


def test_planted_symlinks_are_not_followed(tmp_path: Path, outdir: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outdir / "k=1").symlink_to(outside)
    table = pa.table({"k": [1], "v": [1]})
    writer = make_writer(outdir, {"partition_by": ["k"]}, table.schema)
    with pytest.raises(SourceError, match=r"`k=1`.*not a plain directory"):
        writer.write_batch(table.to_batches()[0])
    writer.abort()
    assert list(outside.iterdir()) == []

    target = outside / "victim"
    target.write_text("keep")
    (outdir / "part-0123456789abcdef-run-00001.parquet").symlink_to(target)
    writer = make_writer(outdir, {}, table.schema)
    writer.write_batch(table.to_batches()[0])
    with pytest.raises(SourceError, match="already exists"):
        writer.finalize()
    writer.abort()
    assert target.read_text() == "keep"


def test_config_errors(outdir: Path) -> None:
    ctx = PluginContext(RUN_ID, "writer", output_dir=outdir)
    with pytest.raises(PluginConfigError) as err:
        ParquetWriter().initialize(
            {"compression": "lz5", "target_file_size": "12 parsecs", "file_prefix": "../x"}, ctx
        )
    text = str(err.value)
    assert "`compression`" in text
    assert "'zstd'" in text
    assert "lz5" in text
    assert "`target_file_size`" in text
    assert "MiB" in text
    assert "`file_prefix`" in text
    with pytest.raises(PluginConfigError, match="no output directory"):
        ParquetWriter().initialize({}, PluginContext(RUN_ID, "writer"))


def test_written_files_have_plain_permissions(outdir: Path) -> None:
    result = write(outdir, {}, generate_table(10, 2))
    mode = os.stat(outdir / result.files[0].path).st_mode & 0o777
    assert mode & 0o600 == 0o600
