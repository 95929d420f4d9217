"""Commits staged data files to lake tables; the only user of pyiceberg.

The writer plugin stages Parquet files in a directory of its own; the supervisor validates them
(`dativo.supervisor._publish`) and hands them to a **committer** from here, which makes them part
of the target with credentials that never enter a plugin container:

- `IcebergCommitter` (`format: iceberg`): loads or creates the table in its catalog (SQL on
  SQLite or PostgreSQL, or REST), evolves its schema when the data adds columns or widens types
  (and refuses anything else), moves or uploads the files into the table's data location (or
  rewrites them through pyiceberg when the table is partitioned, or the mode is `upsert`), and
  commits one atomic change whose snapshot summary records `dativo.run-id` and
  `dativo.cursor` (the reader's final state);
- `S3ParquetCommitter` (`format: parquet` with `target.path: s3://...`): uploads the files.

Both are driven through the publish journal, so a crash between the commit and the save of the
state is recognised on the next run (`find`) and the commit is not applied twice.

pyiceberg is imported only when an Iceberg job runs, in a background thread started with the
run, so that the import overlaps with the containers' start and the stream.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dativo.errors import ConfigError
from dativo.lake._base import CommitRecord, Committer, LakeError, LakeFile, SchemaEvolutionError
from dativo.lake._env import aws_settings, expand_env
from dativo.lake._s3 import S3ParquetCommitter

__all__ = [
    "CommitRecord",
    "Committer",
    "LakeError",
    "LakeFile",
    "S3ParquetCommitter",
    "SchemaEvolutionError",
    "aws_settings",
    "committer_for",
    "expand_env",
]


def committer_for(job: object) -> Committer | None:
    """The committer a job's target needs, or None for a local Parquet directory.

    An Iceberg committer starts warming up at once in a background thread (importing pyiceberg,
    opening the catalog, loading the table), so that work overlaps with the run instead of
    adding to it.
    """
    from dativo.config import JobConfig

    assert isinstance(job, JobConfig)
    if job.target.format == "iceberg":
        return _WarmingCommitter(job)
    if job.target_url is not None:
        return S3ParquetCommitter(job.target_url)
    return None


class _WarmingCommitter:
    """An `IcebergCommitter` built in a background thread; every call waits for it."""

    kind = "iceberg"

    def __init__(self, job: Any) -> None:
        self._job = job
        self._real: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._build, name="dativo-lake", daemon=True)
        self._thread.start()

    def _build(self) -> None:
        try:
            from dativo.lake._iceberg import IcebergCommitter

            real = IcebergCommitter(self._job)
            real.warm()
            self._real = real
        except BaseException as exc:  # raised again, in the caller's thread, on first use
            self._error = exc

    def _get(self) -> Any:
        self._thread.join()
        if self._real is None:
            try:
                from dativo.lake._iceberg import IcebergCommitter
            except ImportError as exc:
                raise ConfigError(
                    f"`target.format: iceberg` needs pyiceberg next to the supervisor ({exc}); "
                    "install `dativo[supervisor]`",
                    field="target.format",
                ) from None
            self._real = IcebergCommitter(self._job)
        return self._real

    def describe(self) -> dict[str, Any]:
        return self._get().describe()  # type: ignore[no-any-return]

    def close(self) -> None:
        self._thread.join()
        if self._real is not None:
            self._real.close()

    def check(self, staging: Path, files: Sequence[LakeFile]) -> None:
        self._get().check(staging, files)

    def find(self, run_id: str) -> CommitRecord | None:
        return self._get().find(run_id)  # type: ignore[no-any-return]

    def commit(
        self, staging: Path, files: Sequence[LakeFile], run_id: str, state: dict[str, Any] | None
    ) -> dict[str, Any]:
        return self._get().commit(staging, files, run_id, state)  # type: ignore[no-any-return]
