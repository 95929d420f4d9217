"""Incremental state and run history, in an embedded SQLite database."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dativo.errors import StateError

__all__ = ["StateStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS job_state (
    job TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    run_id TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    job TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL,
    status TEXT NOT NULL,
    rows INTEGER,
    report TEXT
);
"""


class StateStore:
    """One SQLite file; every write is its own transaction, so a crash leaves the last commit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"cannot open the state database `{path}`: {exc}") from None

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            yield db
        finally:
            db.close()

    def get(self, job: str) -> dict[str, Any] | None:
        """The state saved by the job's last successful run, or None."""
        try:
            with self._connect() as db:
                row = db.execute("SELECT state FROM job_state WHERE job = ?", (job,)).fetchone()
        except sqlite3.Error as exc:
            raise StateError(f"cannot read state of `{job}` from `{self.path}`: {exc}") from None
        return None if row is None else dict(json.loads(row[0]))

    def describe(self, job: str) -> dict[str, Any] | None:
        """State with the run that saved it and when."""
        with self._connect() as db:
            row = db.execute(
                "SELECT state, run_id, updated_at FROM job_state WHERE job = ?", (job,)
            ).fetchone()
        if row is None:
            return None
        return {"state": json.loads(row[0]), "run_id": row[1], "updated_at": row[2]}

    def save(self, job: str, state: dict[str, Any], run_id: str) -> None:
        """Replace the job's state atomically."""
        try:
            payload = json.dumps(state, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise StateError(f"incremental state of `{job}` is not JSON: {exc}") from None
        try:
            with self._connect() as db:
                db.execute(
                    "INSERT INTO job_state (job, state, run_id, updated_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(job) DO UPDATE SET state = excluded.state, "
                    "run_id = excluded.run_id, updated_at = excluded.updated_at",
                    (job, payload, run_id, time.time()),
                )
        except sqlite3.Error as exc:
            raise StateError(f"cannot save state of `{job}` to `{self.path}`: {exc}") from None

    def reset(self, job: str) -> bool:
        """Forget the job's state; return whether there was any."""
        with self._connect() as db:
            cursor = db.execute("DELETE FROM job_state WHERE job = ?", (job,))
        return cursor.rowcount > 0

    def record_run(
        self, run_id: str, job: str, started_at: float, status: str, report: dict[str, Any]
    ) -> None:
        """Keep the run's report in the history table."""
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO runs (run_id, job, started_at, ended_at, status, rows, "
                "report) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    job,
                    started_at,
                    time.time(),
                    status,
                    report.get("rows"),
                    json.dumps(report, default=str),
                ),
            )

    def runs(self, job: str, limit: int = 20) -> list[dict[str, Any]]:
        """The job's latest runs, newest first."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT run_id, started_at, ended_at, status, rows FROM runs WHERE job = ? "
                "ORDER BY started_at DESC LIMIT ?",
                (job, limit),
            ).fetchall()
        keys = ("run_id", "started_at", "ended_at", "status", "rows")
        return [dict(zip(keys, row, strict=True)) for row in rows]
