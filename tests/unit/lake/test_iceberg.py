"""The Iceberg committer on a SQLite catalog in a temporary directory: no Docker."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from pyiceberg.table.metadata import TableMetadataUtil

from dativo.config import JobConfig
from dativo.errors import ConfigError
from dativo.lake import LakeError, SchemaEvolutionError, committer_for
from dativo.supervisor import _publish
from tests.unit.lake.helpers import (
    cursor,
    data_file_paths,
    lake_files,
    lake_job,
    read_data_files,
    sort,
    stage,
    summaries,
    table,
)


class States:
    """A stand-in for the state store: remembers every save."""

    def __init__(self) -> None:
        self.saved: list[tuple[dict[str, Any], str]] = []

    def __call__(self, state: dict[str, Any], run_id: str) -> None:
        self.saved.append((state, run_id))


def commit(
    job: JobConfig, run_id: str, *tables: pa.Table, state: dict[str, Any] | None = None
) -> dict[str, Any]:
    committer = committer_for(job)
    assert committer is not None
    staging, files = stage(job, run_id, *tables)
    base = job.staging_base
    assert base is not None
    detail = _publish.publish_lake(
        base,
        run_id,
        files,
        job=job.name,
        state=state,
        save_state=States(),
        committer=committer,
    )
    assert not staging.exists(), "the staging directory is removed after the commit"
    assert not list(_publish.staging_root(base).glob("*.publish.json")), "journal removed"
    return detail


INT64 = pa.int64()


def orders(ids: range, *, id_type: pa.DataType = INT64, **extra: pa.Array) -> pa.Table:
    n = len(ids)
    columns: dict[str, Any] = {
        "id": pa.array(list(ids), id_type),
        "amount": pa.array([i * 1.5 for i in ids], pa.float64()),
        "day": pa.array([dt.date(2026, 1, 1 + i % 3) for i in ids], pa.date32()),
        "name": pa.array([f"n{i}" for i in ids], pa.string()),
    }
    columns.update(extra)
    assert all(len(c) == n for c in columns.values())
    return pa.table(columns)


# -- create, append, read back ------------------------------------------------------------


def test_append_creates_the_table_and_reads_back_identically(tmp_path: Path) -> None:
    job = lake_job(tmp_path)
    first, second = orders(range(0, 100)), orders(range(100, 250))
    detail = commit(job, "run-1", first, second, state={"files": {"a.csv": 1}})
    assert detail["committed"] is True
    assert detail["table"] == "default.orders"
    assert detail["rows"] == 250
    tbl = table(job)
    expected = sort(pa.concat_tables([first, second]))
    assert sort(tbl.scan().to_arrow()).equals(expected)
    # pyarrow, from the data files the manifests list, without any Iceberg reader.
    assert sort(read_data_files(tbl)).equals(expected)
    # Registered as staged: no rewrite, moved under the table's data location.
    paths = data_file_paths(tbl)
    assert len(paths) == 2
    assert all("/warehouse/default/orders/data/run-1/part-run-1-" in p for p in paths)
    # The snapshot records the run and the reader's cursor.
    (summary,) = summaries(tbl)
    assert summary["dativo.run-id"] == "run-1"
    assert summary["dativo.job"] == "orders"
    assert cursor(summary) == {"files": {"a.csv": 1}}
    assert tbl.current_snapshot().summary.operation.value == "append"


def test_metadata_is_valid_iceberg(tmp_path: Path) -> None:
    job = lake_job(tmp_path)
    commit(job, "run-1", orders(range(10)))
    commit(job, "run-2", orders(range(10, 20)))
    tbl = table(job)
    # The metadata file parses as Iceberg table metadata (format v2) and is self-consistent.
    path = tbl.metadata_location.removeprefix("file://")
    metadata = TableMetadataUtil.parse_raw(Path(path).read_text())
    assert metadata.format_version == 2
    assert metadata.current_snapshot_id == tbl.current_snapshot().snapshot_id
    assert [s.snapshot_id for s in metadata.snapshots] == [
        e.snapshot_id for e in metadata.snapshot_log
    ]
    assert metadata.snapshots[1].parent_snapshot_id == metadata.snapshots[0].snapshot_id
    assert [f.name for f in metadata.schema().fields] == ["id", "amount", "day", "name"]
    assert metadata.last_column_id == 4
    # Manifests: the manifest list of the current snapshot names them, and their entries the
    # data files, with row counts and column statistics.
    manifests = tbl.inspect.manifests()
    assert manifests.num_rows >= 1
    assert (
        sum(manifests.column("added_data_files_count").to_pylist())
        + sum(manifests.column("existing_data_files_count").to_pylist())
        == 2
    )
    files = tbl.inspect.files()
    assert files.column("record_count").to_pylist() == [10, 10]
    assert all(Path(p).is_file() for p in data_file_paths(tbl))
    bounds = files.column("lower_bounds").to_pylist()
    assert all(b for b in bounds), "column statistics are recorded"
    name_mapping = json.loads(tbl.properties["schema.name-mapping.default"])
    assert [m["names"] for m in name_mapping] == [["id"], ["amount"], ["day"], ["name"]]


def test_overwrite_replaces_every_row_in_one_snapshot(tmp_path: Path) -> None:
    job = lake_job(tmp_path, mode="overwrite")
    commit(job, "run-1", orders(range(0, 50)))
    commit(job, "run-2", orders(range(1000, 1010)))
    tbl = table(job)
    assert sort(tbl.scan().to_arrow()).equals(orders(range(1000, 1010)))
    assert sort(read_data_files(tbl)).equals(orders(range(1000, 1010)))
    assert len(tbl.metadata.snapshots) == 2
    assert tbl.current_snapshot().summary.operation.value == "overwrite"
    assert summaries(tbl)[-1]["dativo.run-id"] == "run-2"


def test_upsert_updates_matches_and_inserts_the_rest(tmp_path: Path) -> None:
    job = lake_job(tmp_path, mode="upsert", key=["id"])
    commit(job, "run-1", orders(range(0, 10)), state={"cursor": 1})
    changed = orders(range(5, 15)).set_column(1, "amount", pa.array([-1.0] * 10))
    commit(job, "run-2", changed, state={"cursor": 2})
    result = sort(table(job).scan().to_arrow())
    assert result.column("id").to_pylist() == list(range(15))
    assert result.column("amount").to_pylist() == [i * 1.5 for i in range(5)] + [-1.0] * 10
    tbl = table(job)
    assert sort(read_data_files(tbl)).equals(result)
    assert {s["dativo.run-id"] for s in summaries(tbl)} == {"run-1", "run-2"}
    # The same upsert again changes nothing, yet the run and its cursor are still recorded.
    commit(job, "run-3", changed, state={"cursor": 3})
    tbl = table(job)
    assert sort(tbl.scan().to_arrow()).equals(result)
    assert cursor(summaries(tbl)[-1]) == {"cursor": 3}


def test_upsert_refuses_duplicate_keys_before_anything_is_written(tmp_path: Path) -> None:
    job = lake_job(tmp_path, mode="upsert", key=["id"])
    commit(job, "run-1", orders(range(3)))
    with pytest.raises(LakeError, match=r"same key \(id\) more than once"):
        commit(job, "run-2", orders(range(2)), orders(range(1, 3)))
    base = job.staging_base
    assert base is not None
    assert not list(_publish.staging_root(base).glob("*.publish.json")), "no journal written"
    assert len(table(job).metadata.snapshots) == 1


def test_partitioned_append_splits_by_the_job_spec(tmp_path: Path) -> None:
    job = lake_job(
        tmp_path,
        partition_by=[
            {"column": "day", "transform": "day"},
            {"column": "id", "transform": "bucket[4]"},
        ],
    )
    data = orders(range(0, 300))
    commit(job, "run-1", data, state={"n": 1})
    tbl = table(job)
    spec = tbl.spec()
    assert [(f.name, str(f.transform)) for f in spec.fields] == [
        ("day_day", "day"),
        ("id_bucket_4", "bucket[4]"),
    ]
    assert sort(tbl.scan().to_arrow()).equals(data)
    assert sort(read_data_files(tbl)).equals(data)
    partitions = tbl.inspect.partitions()
    assert 3 < partitions.num_rows <= 12
    assert sum(partitions.column("record_count").to_pylist()) == 300
    assert summaries(tbl)[0]["dativo.run-id"] == "run-1"
    # Partition pruning works on the committed metadata.
    assert tbl.scan(row_filter="day = '2026-01-02'").to_arrow().num_rows == 100


def test_an_existing_table_must_match_the_partition_spec(tmp_path: Path) -> None:
    commit(lake_job(tmp_path), "run-1", orders(range(5)))
    job = lake_job(tmp_path, partition_by=[{"column": "day", "transform": "month"}])
    with pytest.raises(ConfigError, match=r"partitioned by nothing \(unpartitioned\), but"):
        commit(job, "run-2", orders(range(5, 10)))


def test_unknown_partition_or_key_column_is_a_config_error(tmp_path: Path) -> None:
    job = lake_job(tmp_path, partition_by=[{"column": "when", "transform": "day"}])
    with pytest.raises(ConfigError, match=r"partition_by\[0\].column`: the data has no column"):
        commit(job, "run-1", orders(range(5)))
    job = lake_job(tmp_path, mode="upsert", key=["order_id"])
    with pytest.raises(ConfigError, match=r"`target\.iceberg\.key`: the data has no column"):
        commit(job, "run-2", orders(range(5)))


# -- schema evolution ---------------------------------------------------------------------


def test_added_column_evolves_the_schema(tmp_path: Path) -> None:
    job = lake_job(tmp_path)
    commit(job, "run-1", orders(range(0, 5)))
    newer = orders(range(5, 8), tag=pa.array(["x", "y", "z"]))
    commit(job, "run-2", newer)
    tbl = table(job)
    assert [f.name for f in tbl.schema().fields] == ["id", "amount", "day", "name", "tag"]
    result = sort(tbl.scan().to_arrow())
    assert result.column("tag").to_pylist() == [None] * 5 + ["x", "y", "z"]
    # pyiceberg gives a column that older files lack as large_string; same values.
    from_files = sort(read_data_files(tbl))
    assert result.cast(from_files.schema).equals(from_files)


def test_int32_widens_to_int64(tmp_path: Path) -> None:
    job = lake_job(tmp_path)
    commit(job, "run-1", orders(range(0, 5), id_type=pa.int32()))
    assert str(table(job).schema().find_field("id").field_type) == "int"
    commit(job, "run-2", orders(range(5, 10), id_type=pa.int64()))
    tbl = table(job)
    assert str(tbl.schema().find_field("id").field_type) == "long"
    result = sort(tbl.scan().to_arrow())
    assert result.schema.field("id").type == pa.int64()
    assert result.column("id").to_pylist() == list(range(10))
    # Narrower data into the wider column is accepted as it is.
    commit(job, "run-3", orders(range(10, 12), id_type=pa.int32()))
    assert table(job).scan().to_arrow().num_rows == 12


def test_incompatible_change_is_refused_and_nothing_is_committed(tmp_path: Path) -> None:
    job = lake_job(tmp_path)
    commit(job, "run-1", orders(range(0, 5)))
    before = table(job)
    bad = orders(range(5, 7)).set_column(1, "amount", pa.array(["a", "b"]))
    with pytest.raises(SchemaEvolutionError) as caught:
        commit(job, "run-2", bad)
    message = str(caught.value)
    assert "column `amount` is `double` in Iceberg table `default.orders`" in message
    assert "but `string` in this run's data" in message
    assert "nothing was committed" in message
    assert isinstance(caught.value, ConfigError)
    after = table(job)
    assert after.metadata_location == before.metadata_location
    assert after.schema() == before.schema()
    base = job.staging_base
    assert base is not None
    assert not list(_publish.staging_root(base).glob("*.publish.json"))


def test_narrowing_is_refused(tmp_path: Path) -> None:
    job = lake_job(tmp_path)
    commit(job, "run-1", orders(range(0, 5)))
    narrower = orders(range(5, 7)).set_column(1, "amount", pa.array([1, 2], pa.int64()))
    with pytest.raises(SchemaEvolutionError, match=r"`amount` is `double`.*but `long`"):
        commit(job, "run-2", narrower)


# -- exactly once -------------------------------------------------------------------------


class Crash(BaseException):
    """Stands for a SIGKILL: nothing after it runs."""


def test_a_commit_whose_state_save_was_interrupted_is_not_applied_twice(tmp_path: Path) -> None:
    job = lake_job(tmp_path)
    committer = committer_for(job)
    assert committer is not None
    base = job.staging_base
    assert base is not None
    staging, files = stage(job, "run-1", orders(range(10)))

    def crash(state: dict[str, Any], run_id: str) -> None:
        raise Crash

    with pytest.raises(Crash):
        _publish.publish_lake(
            base,
            "run-1",
            files,
            job=job.name,
            state={"cursor": 10},
            save_state=crash,
            committer=committer,
        )
    assert len(table(job).metadata.snapshots) == 1  # committed; the state was not saved
    assert staging.exists()
    # The next run recovers: it finds the snapshot of run-1 and saves the state only.
    states = States()
    recovered = _publish.recover(
        base,
        job=job.name,
        is_alive=lambda run_id: False,
        save_state=states,
        committer=committer_for(job),
    )
    assert recovered == ["run-1"]
    assert states.saved == [({"cursor": 10}, "run-1")]
    tbl = table(job)
    assert len(tbl.metadata.snapshots) == 1
    assert tbl.scan().to_arrow().num_rows == 10
    assert not staging.exists()
    assert not list(_publish.staging_root(base).glob("*.publish.json"))


def test_a_journal_without_a_commit_is_rolled_forward_once(tmp_path: Path) -> None:
    job = lake_job(tmp_path)
    base = job.staging_base
    assert base is not None
    staging, files = stage(job, "run-1", orders(range(10)))

    class DiesBeforeCommit:
        kind = "iceberg"

        def __init__(self) -> None:
            self.real = committer_for(job)

        def describe(self) -> dict[str, Any]:
            return self.real.describe()  # type: ignore[union-attr]

        def check(self, staging: Path, files: Any) -> None:
            self.real.check(staging, files)  # type: ignore[union-attr]

        def find(self, run_id: str) -> Any:
            raise AssertionError("not called on a fresh run")

        def commit(self, *args: Any) -> Any:
            raise Crash

    with pytest.raises(Crash):
        _publish.publish_lake(
            base,
            "run-1",
            files,
            job=job.name,
            state={"cursor": 10},
            save_state=States(),
            committer=DiesBeforeCommit(),  # type: ignore[arg-type]
        )
    assert table(job).metadata.snapshots == []  # created by the check, nothing committed
    states = States()
    for _ in range(2):  # a second recovery finds nothing left to do
        _publish.recover(
            base,
            job=job.name,
            is_alive=lambda r: False,
            save_state=states,
            committer=committer_for(job),
        )
    assert states.saved == [({"cursor": 10}, "run-1")]
    tbl = table(job)
    assert len(tbl.metadata.snapshots) == 1
    assert sort(tbl.scan().to_arrow()).equals(orders(range(10)))
    assert not staging.exists()


def test_files_moved_before_a_crash_are_committed_from_where_they_are(tmp_path: Path) -> None:
    job = lake_job(tmp_path)
    committer = committer_for(job)
    assert committer is not None
    staging, files = stage(job, "run-1", orders(range(5)), orders(range(5, 9)))
    committer.check(staging, lake_files(files))
    # Move the first file as an interrupted attempt would have.
    real = committer._get()  # type: ignore[attr-defined]
    tbl = real._load(required=True)
    real._place(tbl, staging, lake_files(files)[:1], "run-1")
    assert not (staging / files[0].path).exists()
    detail = committer.commit(staging, lake_files(files), "run-1", {"c": 1})
    assert detail["committed"] is True
    assert sort(table(job).scan().to_arrow()).equals(orders(range(9)))
    # And committing the same run again finds it instead of appending it twice.
    again = committer_for(job)
    assert again is not None
    assert again.commit(staging, lake_files(files), "run-1", {"c": 1})["committed"] is True
    assert table(job).scan().to_arrow().num_rows == 9
    found = again.find("run-1")
    assert found is not None
    assert found.state == {"c": 1}
    assert again.find("run-2") is None


def test_nothing_staged_commits_nothing(tmp_path: Path) -> None:
    job = lake_job(tmp_path)
    detail = commit(job, "run-1", state={"c": 1})
    assert detail["committed"] is False
    commit(job, "run-2", orders(range(3)))
    assert commit(job, "run-3")["committed"] is False
    assert len(table(job).metadata.snapshots) == 1


def test_non_parquet_staged_files_are_refused(tmp_path: Path) -> None:
    job = lake_job(tmp_path)
    base = job.staging_base
    assert base is not None
    staging = _publish.staging_root(base) / "run-1"
    staging.mkdir(parents=True)
    (staging / "rows.csv").write_text("id\n1\n")
    files = [_publish.StagedFile("rows.csv", 1, 5, {})]
    with pytest.raises(LakeError, match="Iceberg tables take Parquet data files only"):
        _publish.publish_lake(
            base,
            "run-1",
            files,
            job=job.name,
            state=None,
            save_state=States(),
            committer=committer_for(job),  # type: ignore[arg-type]
        )
