"""The committer interface and the errors of the lake package."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dativo.errors import ConfigError, DativoError

__all__ = ["CommitRecord", "Committer", "LakeError", "LakeFile", "SchemaEvolutionError"]

RUN_ID_PROPERTY = "dativo.run-id"
CURSOR_PROPERTY = "dativo.cursor"
JOB_PROPERTY = "dativo.job"


class LakeError(DativoError):
    """Committing to the lake failed: the catalog or the storage refused or could not be
    reached, or the data cannot be committed as the job asks (duplicate upsert keys, say).

    Messages never hold a credential: values expanded from `${VAR}` references are masked.
    """


class SchemaEvolutionError(ConfigError):
    """The data's schema cannot be reconciled with the table's: a column changed to a type
    that is not a widening Iceberg allows. Nothing was committed."""


@dataclass(frozen=True)
class LakeFile:
    """One validated file in the staging directory."""

    path: str  # relative POSIX path inside the staging directory
    rows: int
    bytes: int


@dataclass(frozen=True)
class CommitRecord:
    """A commit found in the target: which run made it and the reader state it recorded."""

    run_id: str
    state: dict[str, Any] | None
    detail: dict[str, Any] = field(default_factory=dict)


class Committer(Protocol):
    """Makes staged files part of a lake target.

    The supervisor calls, in order: `check` (before the journal is written: anything that
    would refuse the data raises here, so a refused run leaves nothing to roll forward), then
    `find` and `commit` (also when rolling a journal forward after a crash; `commit` must then
    cope with files already moved), then saves the reader state.
    """

    kind: str

    def describe(self) -> dict[str, Any]:
        """What the target is, for the journal and the run report; never a credential."""
        ...

    def check(self, staging: Path, files: Sequence[LakeFile]) -> None:
        """Refuse data that cannot be committed; prepare the target (create the table)."""
        ...

    def find(self, run_id: str) -> CommitRecord | None:
        """The commit of `run_id`, if it reached the target; None when it cannot tell (S3
        objects: re-uploading is idempotent)."""
        ...

    def commit(
        self, staging: Path, files: Sequence[LakeFile], run_id: str, state: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Commit the files atomically with the run id and the reader state; return details
        for the report."""
        ...

    def close(self) -> None:
        """Release connections (the catalog's database pool)."""
        ...
