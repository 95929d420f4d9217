"""Shared helpers of the lake unit tests: jobs, staged files, reading tables back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.table import Table

from dativo.config import JobConfig, parse_job
from dativo.lake import LakeFile
from dativo.supervisor._publish import StagedFile, staging_root


def lake_job(tmp_path: Path, name: str = "orders", **iceberg: Any) -> JobConfig:
    return parse_job(
        {
            "version": 1,
            "name": name,
            "source": {"reader": {"type": "builtin", "name": "generate"}},
            "target": {
                "format": "iceberg",
                "iceberg": {"table": "orders", **iceberg},
                "writer": {"type": "builtin", "name": "parquet"},
            },
        },
        base_dir=tmp_path,
    )


def stage(job: JobConfig, run_id: str, *tables: pa.Table) -> tuple[Path, list[StagedFile]]:
    """Write `tables` as the staged Parquet files of `run_id`, as the writer would."""
    base = job.staging_base
    assert base is not None
    staging = staging_root(base) / run_id
    staging.mkdir(parents=True)
    files = []
    for i, table in enumerate(tables):
        name = f"part-{run_id}-{i:05d}.parquet"
        pq.write_table(table, staging / name)
        files.append(StagedFile(name, table.num_rows, (staging / name).stat().st_size, {}))
    return staging, files


def lake_files(files: list[StagedFile]) -> list[LakeFile]:
    return [LakeFile(f.path, f.rows, f.bytes) for f in files]


def catalog(job: JobConfig) -> SqlCatalog:
    uri = job.iceberg_catalog_uri
    assert uri is not None
    return SqlCatalog("dativo", uri=uri)


def table(job: JobConfig) -> Table:
    return catalog(job).load_table(("default", "orders"))


def data_file_paths(tbl: Table) -> list[str]:
    """Local paths of the current snapshot's data files, from the manifests."""
    paths = tbl.inspect.files().column("file_path").to_pylist()
    return [urlparse(p).path if p.startswith("file:") else p for p in paths]


def read_data_files(tbl: Table) -> pa.Table:
    """The table's rows read by pyarrow from its data files alone (no Iceberg reader)."""
    parts = [pq.read_table(path) for path in data_file_paths(tbl)]
    return pa.concat_tables(parts, promote_options="permissive")


def sort(t: pa.Table, key: str = "id") -> pa.Table:
    return t.sort_by(key)


def summaries(tbl: Table) -> list[dict[str, str]]:
    return [
        dict(s.summary.additional_properties) if s.summary else {} for s in tbl.metadata.snapshots
    ]


def cursor(summary: dict[str, str]) -> Any:
    return json.loads(summary["dativo.cursor"])
