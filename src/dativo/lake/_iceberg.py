"""The Iceberg committer: staged Parquet files become one atomic commit of an Iceberg table.

How the data gets into the table depends on what pyiceberg can do without rewriting it:

- `append` to an unpartitioned table: the files are moved (local warehouse) or uploaded (S3)
  into the table's data location and registered as they are (`add_files`): no rewrite;
- `overwrite` of an unpartitioned table: the same, in one `overwrite` snapshot that also removes
  every earlier data file;
- `append` or `overwrite` of a partitioned table: rewritten by pyiceberg, split by partition
  (the writer's files are not split by the table's partition spec);
- `upsert`: rewritten by pyiceberg's `upsert` (copy-on-write: the data files holding matched
  keys are rewritten too).

A rewrite costs reading every staged file back into the supervisor's memory (one file at a
time for `append` and `overwrite`; the whole run's data for `upsert`) and writing it again.
Registering files as they are costs reading their footers.

Every commit is one catalog transaction that also evolves the schema when needed, and the
snapshots it adds carry `dativo.run-id`, `dativo.cursor` (the reader's final state as JSON) and
`dativo.job` in their summary. `find(run_id)` looks for them, so a run whose state save was
interrupted is recognised and not committed twice.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.parquet as pq
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import (
    CommitFailedException,
    NamespaceAlreadyExistsError,
    NoSuchTableError,
    TableAlreadyExistsError,
)
from pyiceberg.io.pyarrow import _dataframe_to_data_files, parquet_file_to_data_file
from pyiceberg.manifest import ManifestContent
from pyiceberg.table import Table, Transaction

from dativo.config import JobConfig
from dativo.errors import ConfigError, DativoError
from dativo.lake._base import (
    CURSOR_PROPERTY,
    JOB_PROPERTY,
    RUN_ID_PROPERTY,
    CommitRecord,
    LakeError,
    LakeFile,
)
from dativo.lake._env import Redactor, aws_settings, expand_env
from dativo.lake._s3 import open_staged
from dativo.lake._schema import needs_evolution

__all__ = ["IcebergCommitter"]

log = logging.getLogger(__name__)

_CHUNK = 8 << 20
_COMMIT_ATTEMPTS = 3
_NAME_MAPPING = "schema.name-mapping.default"


class IcebergCommitter:
    """Commits a run's staged Parquet files to the job's Iceberg table."""

    kind = "iceberg"

    def __init__(self, job: JobConfig) -> None:
        spec = job.target.iceberg
        assert spec is not None
        assert job.iceberg_table is not None
        self.spec = spec
        self.job_name = job.name
        namespace, name = job.iceberg_table
        self.namespace = tuple(namespace.split("."))
        self.identifier = (*self.namespace, name)
        self.table_name = f"{namespace}.{name}"
        self.warehouse = job.iceberg_warehouse
        self.uri = job.iceberg_catalog_uri
        self.redact = Redactor()
        self._catalog: Catalog | None = None
        self._warm_table: Table | None = None

    # -- the committer interface ---------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "format": "iceberg",
            "table": self.table_name,
            "mode": self.spec.mode,
            "catalog": self.spec.catalog.type,
            "warehouse": self.warehouse,
        }

    def check(self, staging: Path, files: Sequence[LakeFile]) -> None:
        if not files:
            return
        schema = self._staged_schema(staging, files)
        self._check_columns(schema)
        table = self._warm_table or self._load_or_create(schema)
        self._check_partitioning(table)
        needs_evolution(table.schema(), schema, table=self.table_name)
        if self.spec.mode == "upsert":
            self._check_keys(staging, files)

    def find(self, run_id: str) -> CommitRecord | None:
        table = self._load(required=False)
        if table is None:
            return None
        return _find(table, run_id)

    def commit(
        self, staging: Path, files: Sequence[LakeFile], run_id: str, state: dict[str, Any] | None
    ) -> dict[str, Any]:
        properties = {
            RUN_ID_PROPERTY: run_id,
            CURSOR_PROPERTY: json.dumps(state, sort_keys=True, separators=(",", ":")),
            JOB_PROPERTY: self.job_name,
        }
        detail: dict[str, Any] = {**self.describe(), "committed": False}
        for attempt in range(1, _COMMIT_ATTEMPTS + 1):
            table = self._load(required=bool(files))
            if table is None:
                return detail  # nothing staged and no table: nothing to commit
            found = _find(table, run_id)
            if found is not None:
                return {**detail, **found.detail, "committed": True}
            if not files and self.spec.mode != "overwrite":
                return detail  # nothing to add: no snapshot, the state alone moves
            try:
                committed = self._commit_once(table, staging, files, properties)
            except CommitFailedException as exc:
                if attempt == _COMMIT_ATTEMPTS:
                    raise LakeError(
                        f"Iceberg table `{self.table_name}` changed under this commit "
                        f"{_COMMIT_ATTEMPTS} times in a row: {self._text(exc)}",
                        transient=True,
                    ) from None
                log.warning("Iceberg table %s changed meanwhile; retrying", self.table_name)
                continue
            except DativoError:
                raise
            except Exception as exc:
                raise LakeError(
                    f"committing to Iceberg table `{self.table_name}` failed: {self._text(exc)}",
                    transient=isinstance(exc, OSError),
                ) from None
            snapshot = committed.metadata.current_snapshot()
            return {
                **detail,
                "committed": True,
                "snapshot_id": None if snapshot is None else snapshot.snapshot_id,
                "data_files": len(files),
                "rows": sum(f.rows for f in files),
            }
        return detail  # not reached

    def warm(self) -> None:
        """Open the catalog and load the table ahead of the commit (best effort)."""
        try:
            self._warm_table = self._load(required=False)
        except DativoError:
            self._catalog = None  # tried again, and reported, when the commit needs it

    def close(self) -> None:
        catalog, self._catalog, self._warm_table = self._catalog, None, None
        engine = getattr(catalog, "engine", None)
        if engine is not None:
            engine.dispose()

    # -- catalog and table ---------------------------------------------------------------------

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            self._catalog = self._open_catalog()
        return self._catalog

    def _open_catalog(self) -> Catalog:
        spec = self.spec.catalog
        properties = {
            key: expand_env(
                value,
                field=f"target.iceberg.catalog.properties.{key}",
                redactor=self.redact,
            )
            for key, value in spec.properties.items()
        }
        assert self.uri is not None
        uri = expand_env(self.uri, field="target.iceberg.catalog.uri", redactor=self.redact)
        properties["uri"] = uri
        properties.setdefault("py-io-impl", "pyiceberg.io.pyarrow.PyArrowFileIO")
        aws = aws_settings()
        properties.setdefault("s3.region", aws["region"])
        if "endpoint" in aws:
            properties.setdefault("s3.endpoint", aws["endpoint"])
        try:
            if spec.type == "sql":
                from pyiceberg.catalog.sql import SqlCatalog

                if uri.startswith("sqlite:///"):
                    Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
                properties.setdefault("warehouse", self._warehouse_uri())
                return SqlCatalog(spec.name, **properties)
            from pyiceberg.catalog.rest import RestCatalog

            return RestCatalog(spec.name, **properties)
        except DativoError:
            raise
        except Exception as exc:
            raise LakeError(
                f"cannot open the {spec.type} catalog of `{self.table_name}`: {self._text(exc)}",
                transient=True,
            ) from None

    def _warehouse_uri(self) -> str:
        if self.warehouse.startswith("s3://"):
            return self.warehouse
        path = Path(self.warehouse)
        path.mkdir(parents=True, exist_ok=True)
        return path.as_uri()

    def _load(self, *, required: bool) -> Table | None:
        try:
            return self.catalog.load_table(self.identifier)
        except NoSuchTableError:
            if required:
                raise LakeError(f"Iceberg table `{self.table_name}` does not exist") from None
            return None
        except DativoError:
            raise
        except Exception as exc:
            raise LakeError(
                f"cannot load Iceberg table `{self.table_name}`: {self._text(exc)}",
                transient=True,
            ) from None

    def _load_or_create(self, schema: pa.Schema) -> Table:
        table = self._load(required=False)
        if table is not None:
            return table
        catalog = self.catalog
        try:
            with contextlib.suppress(NamespaceAlreadyExistsError):
                catalog.create_namespace(self.namespace)
            location = None
            if self.spec.catalog.type == "rest" and self.spec.warehouse is not None:
                location = f"{self.warehouse.rstrip('/')}/{'/'.join(self.identifier)}"
            txn = catalog.create_table_transaction(
                self.identifier, schema=schema, location=location
            )
            if self.spec.partition_by:
                with txn.update_spec() as update:
                    for field in self.spec.partition_by:
                        update.add_field(field.column, field.transform)
            table = txn.commit_transaction()
        except TableAlreadyExistsError:
            return self.catalog.load_table(self.identifier)  # another run created it meanwhile
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"cannot create Iceberg table `{self.table_name}`: {self._text(exc)}",
                field="target.iceberg.partition_by",
            ) from None
        except DativoError:
            raise
        except Exception as exc:
            raise LakeError(
                f"cannot create Iceberg table `{self.table_name}`: {self._text(exc)}",
                transient=isinstance(exc, OSError),
            ) from None
        log.info("created Iceberg table %s", self.table_name)
        return table

    def _check_partitioning(self, table: Table) -> None:
        schema = table.schema()
        actual = [
            (schema.find_column_name(field.source_id), str(field.transform))
            for field in table.spec().fields
        ]
        wanted = [(field.column, field.transform) for field in self.spec.partition_by]
        if actual != wanted:

            def show(spec: Sequence[tuple[str | None, str]]) -> str:
                return ", ".join(f"{t}({c})" for c, t in spec) or "nothing (unpartitioned)"

            raise ConfigError(
                f"Iceberg table `{self.table_name}` is partitioned by {show(actual)}, but "
                f"`target.iceberg.partition_by` says {show(wanted)}; Dativo does not evolve "
                "partition specs: make the job match the table",
                field="target.iceberg.partition_by",
            )

    # -- checks before the journal ----------------------------------------------------------------

    def _staged_schema(self, staging: Path, files: Sequence[LakeFile]) -> pa.Schema:
        schema: pa.Schema | None = None
        for file in files:
            if not file.path.endswith(".parquet"):
                raise LakeError(
                    f"the writer staged `{file.path}`; Iceberg tables take Parquet data files "
                    "only (use the `parquet` writer)"
                )
            with os.fdopen(open_staged(staging, file.path), "rb") as handle:
                found = pq.read_schema(handle)
            found = found.remove_metadata()
            if schema is None:
                schema = found
            elif not found.equals(schema):
                raise LakeError(
                    f"staged files of one run have different schemas (`{file.path}`); "
                    "nothing was committed"
                )
        assert schema is not None
        return schema

    def _check_columns(self, schema: pa.Schema) -> None:
        names = set(schema.names)
        for i, field in enumerate(self.spec.partition_by):
            if field.column not in names:
                raise ConfigError(
                    f"`target.iceberg.partition_by[{i}].column`: the data has no column "
                    f"`{field.column}`; its columns are {_names(schema)}",
                    field=f"target.iceberg.partition_by[{i}].column",
                )
        for column in self.spec.key:
            if column not in names:
                raise ConfigError(
                    f"`target.iceberg.key`: the data has no column `{column}`; its columns "
                    f"are {_names(schema)}",
                    field="target.iceberg.key",
                )

    def _check_keys(self, staging: Path, files: Sequence[LakeFile]) -> None:
        key = list(self.spec.key)
        parts = []
        for file in files:
            with os.fdopen(open_staged(staging, file.path), "rb") as handle:
                parts.append(pq.read_table(handle, columns=key))
        keys = pa.concat_tables(parts)
        for column in key:
            nulls = keys.column(column).null_count
            if nulls:
                raise LakeError(
                    f"upsert into `{self.table_name}`: {nulls} rows have no value in key column "
                    f"`{column}`; nothing was committed"
                )
        if keys.num_rows and keys.group_by(key).aggregate([]).num_rows != keys.num_rows:
            raise LakeError(
                f"upsert into `{self.table_name}`: this run's data holds the same key "
                f"({', '.join(key)}) more than once; upsert needs one row per key. Nothing was "
                "committed"
            )

    # -- the commit --------------------------------------------------------------------------

    def _commit_once(
        self,
        table: Table,
        staging: Path,
        files: Sequence[LakeFile],
        properties: dict[str, str],
    ) -> Table:
        txn = table.transaction()
        if files:
            schema = self._commit_schema(table, staging, files, properties[RUN_ID_PROPERTY])
            self._check_partitioning(table)
            if needs_evolution(txn.table_metadata.schema(), schema, table=self.table_name):
                with txn.update_schema() as update:
                    update.union_by_name(schema)
                log.info("evolved the schema of Iceberg table %s", self.table_name)
        mode = self.spec.mode
        partitioned = not txn.table_metadata.spec().is_unpartitioned()
        run_id = properties[RUN_ID_PROPERTY]
        if mode == "upsert":
            data = pa.concat_tables(self._read(staging, f) for f in files)
            result = txn.upsert(data, join_cols=list(self.spec.key), snapshot_properties=properties)
            if result.rows_updated == 0 and result.rows_inserted == 0:
                # Nothing changed; an empty snapshot still records the run and its cursor.
                with txn.update_snapshot(snapshot_properties=properties).fast_append():
                    pass
        elif mode == "append" and not partitioned:
            paths = self._place(table, staging, files, run_id)
            txn.add_files(paths, snapshot_properties=properties, check_duplicate_files=False)
        else:
            snapshots = txn.update_snapshot(snapshot_properties=properties)
            producer: Any = (
                snapshots.overwrite() if mode == "overwrite" else snapshots.fast_append()
            )
            if not partitioned and files:
                paths = self._place(table, staging, files, run_id)
                _ensure_name_mapping(txn)
            with producer:
                if mode == "overwrite":
                    _delete_every_data_file(txn, table, producer)
                if partitioned:
                    counter = itertools.count(0)
                    for file in files:
                        for data_file in _dataframe_to_data_files(
                            table_metadata=txn.table_metadata,
                            df=self._read(staging, file),
                            io=table.io,
                            write_uuid=producer.commit_uuid,
                            counter=counter,
                        ):
                            producer.append_data_file(data_file)
                elif files:
                    for path in paths:
                        producer.append_data_file(
                            parquet_file_to_data_file(table.io, txn.table_metadata, path)
                        )
        return txn.commit_transaction()

    def _commit_schema(
        self, table: Table, staging: Path, files: Sequence[LakeFile], run_id: str
    ) -> pa.Schema:
        """The files' schema (one for the run, checked before the journal), read from a file
        still staged or, after an interrupted attempt moved them all, from the table's copy."""
        for file in files:
            try:
                fd = open_staged(staging, file.path)
            except FileNotFoundError:
                continue
            with os.fdopen(fd, "rb") as handle:
                return pq.read_schema(handle).remove_metadata()
        location = table.location_provider().new_data_location(f"{run_id}/{files[0].path}")
        with table.io.new_input(location).open() as stream:
            return pq.read_schema(stream).remove_metadata()

    @staticmethod
    def _read(staging: Path, file: LakeFile) -> pa.Table:
        with os.fdopen(open_staged(staging, file.path), "rb") as handle:
            return pq.read_table(handle)

    def _place(
        self, table: Table, staging: Path, files: Sequence[LakeFile], run_id: str
    ) -> list[str]:
        """Move (local) or upload (S3) the staged files into the table's data location.

        Idempotent: a file already moved by an interrupted attempt is left where it is.
        """
        provider = table.location_provider()
        paths = []
        local_dirs: set[Path] = set()
        for file in files:
            destination = provider.new_data_location(f"{run_id}/{file.path}")
            local = _local_path(destination)
            if local is not None:
                _move_local(staging, file, local)
                local_dirs.add(local.parent)
            else:
                try:
                    fd = open_staged(staging, file.path)
                except FileNotFoundError:
                    if len(table.io.new_input(destination)) != file.bytes:
                        raise
                else:
                    with (
                        os.fdopen(fd, "rb") as source,
                        table.io.new_output(destination).create(overwrite=True) as out,
                    ):
                        while chunk := source.read(_CHUNK):
                            out.write(chunk)
            paths.append(destination)
        for directory in local_dirs:
            _fsync_dir(directory)
        return paths

    def _text(self, exc: BaseException) -> str:
        text = str(exc) or type(exc).__name__
        return self.redact(text)[:1000]


def _find(table: Table, run_id: str) -> CommitRecord | None:
    for snapshot in reversed(table.metadata.snapshots):
        properties = snapshot.summary.additional_properties if snapshot.summary else {}
        if properties.get(RUN_ID_PROPERTY) != run_id:
            continue
        try:
            state = json.loads(properties.get(CURSOR_PROPERTY, "null"))
        except ValueError:
            state = None
        return CommitRecord(
            run_id=run_id,
            state=state if isinstance(state, dict) else None,
            detail={"snapshot_id": snapshot.snapshot_id},
        )
    return None


def _ensure_name_mapping(txn: Transaction) -> None:
    """Files registered as they are carry no Iceberg field ids: readers map them by name."""
    if txn.table_metadata.name_mapping() is None:
        mapping = txn.table_metadata.schema().name_mapping.model_dump_json()
        txn.set_properties({_NAME_MAPPING: mapping})


def _delete_every_data_file(txn: Transaction, table: Table, producer: Any) -> None:
    snapshot = txn.table_metadata.current_snapshot()
    if snapshot is None:
        return
    for manifest in snapshot.manifests(table.io):
        if manifest.content != ManifestContent.DATA:
            continue
        for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
            producer.delete_data_file(entry.data_file)


def _local_path(location: str) -> Path | None:
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "":
        return Path(location)
    return None


def _move_local(staging: Path, file: LakeFile, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = open_staged(staging, file.path)
    except FileNotFoundError:
        if destination.is_file() and destination.stat().st_size == file.bytes:
            return  # moved by an earlier, interrupted attempt
        raise LakeError(f"staged file `{file.path}` is gone and not in the table") from None
    os.close(fd)
    source = (staging / file.path).resolve()
    try:
        os.rename(source, destination)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = destination.with_name(f".{destination.name}.tmp")
        shutil.copyfile(source, tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.rename(tmp, destination)
        source.unlink()
    if os.geteuid() == 0:
        os.chown(destination, os.getuid(), os.getgid())
        os.chmod(destination, 0o644)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _names(schema: pa.Schema) -> str:
    return ", ".join(f"`{name}`" for name in schema.names)
