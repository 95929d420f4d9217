"""Staging, validating and publishing a writer's files, with a journal for exactly-once.

The writer's container writes into `<target>/.dativo-staging/<run_id>/`, a directory it owns.
After the container has exited (so nothing can change under us), the supervisor:

1. checks every reported file: a plain relative path, reached without following any symlink,
   a regular file of the reported size (and, for Parquet, the reported row count);
2. writes a journal `<target>/.dativo-staging/<run_id>.publish.json` naming the files and the
   reader state to save, and fsyncs it;
3. renames each file into the target directory (atomic per file, same filesystem);
4. saves the state, then deletes the journal and the staging directory.

A crash between 2 and 4 leaves the journal; the next run of the job rolls it forward, so the
files appear once and the state moves once.

Lake targets (Iceberg tables, Parquet on S3) stage in `<job dir>/.dativo/staging/<job>/` and go
through the same journal, with a committer from `dativo.lake` in place of the renames
(`publish_lake`): the committer checks the files first (a refusal leaves no journal), then
commits them with the run id and the reader state. Rolling such a journal forward asks the
committer whether the run's commit already reached the target (`find`): if so, only the state
is saved (from the commit's own record), so the data is never committed twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from dativo.errors import PluginError
from dativo.lake import Committer, LakeFile

log = logging.getLogger(__name__)

STAGING_DIR = ".dativo-staging"
_SAFE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=%+,@-]{0,254}")
_MAX_FILES = 100_000


@dataclass(frozen=True)
class StagedFile:
    path: str
    rows: int
    bytes: int
    partition: dict[str, str]


def staging_root(target: Path) -> Path:
    return target / STAGING_DIR


def create_staging(target: Path, run_id: str, user: str) -> Path:
    """Create the run's staging directory, owned by the plugin's user."""
    root = staging_root(target)
    root.mkdir(parents=True, exist_ok=True)
    path = root / run_id
    path.mkdir(mode=0o700)
    uid, _, gid = user.partition(":")
    try:
        os.chown(path, int(uid), int(gid))
    except PermissionError:
        # Not root: let the plugin's user in through the mode bits instead.
        os.chmod(path, 0o777)
    return path


def _check_path(raw: Any) -> list[str]:
    if not isinstance(raw, str) or not raw or raw.startswith("/") or "\\" in raw:
        raise ValueError(f"file path `{raw!r}` is not a relative POSIX path")
    parts = raw.split("/")
    for part in parts:
        if part in ("", ".", "..") or not _SAFE_PART.fullmatch(part):
            raise ValueError(f"file path `{raw}` has an unsafe component `{part}`")
    return parts


def _count(entry: dict[str, Any], key: str) -> int:
    """A non-negative integer field of a result entry (not a float, not a bool)."""
    value = entry.get(key)
    if type(value) is not int or value < 0:
        raise ValueError(f"`{key}` of `{entry.get('path')}` is `{value!r}`")
    return value


def _open_dir_chain(root_fd: int, parts: list[str]) -> int:
    """Walk directories below root_fd without following symlinks; return the last dir's fd."""
    fd = os.dup(root_fd)
    for part in parts:
        try:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        finally:
            os.close(fd)
        fd = nxt
    return fd


def validate_staged(
    staging: Path,
    files: list[dict[str, Any]],
    *,
    rows_sent: int,
    plugin: str,
    inspect: Callable[[int, str], int] | None = None,
) -> list[StagedFile]:
    """Check the writer's report against what is really in the staging directory.

    `inspect(fd, path)`, when given, checks each file in place of the plain Parquet read and
    returns its row count (the encrypted-output checks); it raises to refuse the file.
    """

    def fail(message: str) -> PluginError:
        return PluginError(
            message,
            plugin=plugin,
            role="writer",
            rule="result",
            hint="fix the writer: finalize() must report exactly the files it staged",
        )

    if len(files) > _MAX_FILES:
        raise fail(f"reported {len(files)} files; the limit is {_MAX_FILES}")
    staged: list[StagedFile] = []
    seen: set[str] = set()
    root_fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for entry in files:
            try:
                parts = _check_path(entry.get("path"))
                rows, size = _count(entry, "rows"), _count(entry, "bytes")
                partition = entry.get("partition") or {}
                if not isinstance(partition, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in partition.items()
                ):
                    raise ValueError(f"`partition` of `{entry.get('path')}` is not a string map")
            except (ValueError, TypeError, AttributeError) as exc:
                raise fail(str(exc)) from None
            path = "/".join(parts)
            if path in seen:
                raise fail(f"reported `{path}` twice")
            seen.add(path)
            try:
                dir_fd = _open_dir_chain(root_fd, parts[:-1])
                try:
                    # O_NONBLOCK: a FIFO planted as "output" must not block the supervisor.
                    fd = os.open(
                        parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd
                    )
                finally:
                    os.close(dir_fd)
            except OSError as exc:
                raise fail(f"reported `{path}`, which cannot be opened safely ({exc})") from None
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise fail(f"`{path}` is not a regular file")
                if info.st_size != size:
                    raise fail(f"`{path}` has {info.st_size} bytes, reported {size}")
                if inspect is not None:
                    actual = inspect(fd, path)
                    if actual != rows:
                        raise fail(f"`{path}` holds {actual} rows, reported {rows}")
                elif path.endswith(".parquet"):
                    with os.fdopen(os.dup(fd), "rb") as handle:
                        try:
                            actual = pq.ParquetFile(handle).metadata.num_rows
                        except Exception as exc:
                            raise fail(f"`{path}` is not a readable Parquet file ({exc})") from None
                    if actual != rows:
                        raise fail(f"`{path}` holds {actual} rows, reported {rows}")
            finally:
                os.close(fd)
            staged.append(StagedFile(path=path, rows=rows, bytes=size, partition=dict(partition)))
    finally:
        os.close(root_fd)
    total = sum(f.rows for f in staged)
    if total != rows_sent:
        raise fail(f"staged files hold {total} rows but {rows_sent} rows were sent to it")
    return staged


def _journal_path(target: Path, run_id: str) -> Path:
    return staging_root(target) / f"{run_id}.publish.json"


def publish(
    target: Path,
    run_id: str,
    files: list[StagedFile],
    *,
    job: str,
    state: dict[str, Any] | None,
    save_state: Callable[[dict[str, Any], str], None],
    audit: list[dict[str, Any]] | None = None,
    on_audit: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[str]:
    """Move the staged files into the target and save the state, through the journal.

    `audit` (records of encrypted files) is appended to the target's audit log with the
    files; `on_audit` receives the records as chained.
    """
    journal = _journal_path(target, run_id)
    payload: dict[str, Any] = {
        "run_id": run_id,
        "job": job,
        "files": [f.path for f in files],
        "state": state,
    }
    if audit:
        payload["audit"] = {"location": str(target), "records": audit}
    tmp = journal.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        json.dump(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(journal)
    _fsync_dir(journal.parent)
    return _roll_forward(target, payload, save_state, on_audit)


def _append_audit(
    payload: dict[str, Any], on_audit: Callable[[list[dict[str, Any]]], None] | None
) -> None:
    """Append the journal's audit records (once, even when rolled forward again)."""
    audit = payload.get("audit")
    if not audit:
        return
    from dativo.supervisor._audit import AuditLog

    chained = AuditLog(str(audit["location"])).append(list(audit["records"]))
    if on_audit is not None:
        on_audit(chained)


def _roll_forward(
    target: Path,
    payload: dict[str, Any],
    save_state: Callable[[dict[str, Any], str], None],
    on_audit: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[str]:
    run_id = str(payload["run_id"])
    staging = staging_root(target) / run_id
    published = []
    for rel in payload["files"]:
        parts = _check_path(rel)
        destination = target.joinpath(*parts)
        destination.parent.mkdir(parents=True, exist_ok=True)
        root_fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            dir_fd = _open_dir_chain(root_fd, parts[:-1])
            try:
                try:
                    os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    # Moved before a crash interrupted this publication: nothing left to do.
                    if destination.exists():
                        published.append(rel)
                        continue
                    raise
                if destination.exists() or destination.is_symlink():
                    raise PluginError(
                        f"`{rel}` already exists in `{target}`; refusing to overwrite it",
                        plugin=str(payload.get("job")),
                        role="writer",
                        rule="result",
                        hint="writers must put the run id in their file names",
                    )
                os.rename(parts[-1], destination, src_dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
        finally:
            os.close(root_fd)
        if os.geteuid() == 0:
            os.chown(destination, os.getuid(), os.getgid())
        published.append(rel)
    for directory in {target.joinpath(*_check_path(rel)).parent for rel in payload["files"]}:
        _fsync_dir(directory)
    _append_audit(payload, on_audit)
    if payload.get("state") is not None:
        save_state(payload["state"], run_id)
    _journal_path(target, run_id).unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    return published


def publish_lake(
    base: Path,
    run_id: str,
    files: list[StagedFile],
    *,
    job: str,
    state: dict[str, Any] | None,
    save_state: Callable[[dict[str, Any], str], None],
    committer: Committer,
    audit: list[dict[str, Any]] | None = None,
    on_audit: Callable[[list[dict[str, Any]]], None] | None = None,
) -> dict[str, Any]:
    """Commit the staged files to a lake target and save the state, through the journal.

    Returns the committer's details of the commit, for the run report. `audit` records go to
    the audit log at the committer's `location` (an S3 prefix), as in `publish`.
    """
    staging = staging_root(base) / run_id
    committer.check(staging, [LakeFile(f.path, f.rows, f.bytes) for f in files])
    payload = {
        "run_id": run_id,
        "job": job,
        "kind": committer.kind,
        "target": committer.describe(),
        "files": [{"path": f.path, "rows": f.rows, "bytes": f.bytes} for f in files],
        "state": state,
    }
    if audit:
        location = committer.describe().get("location")
        if not isinstance(location, str):
            raise PluginError(
                "encrypted output needs a target with a location for its audit log",
                plugin=job,
                role="writer",
                rule="result",
            )
        payload["audit"] = {"location": location, "records": audit}
    _write_journal(base, run_id, payload)
    return _roll_forward_lake(
        base, payload, save_state, committer, recovering=False, on_audit=on_audit
    )


def _write_journal(base: Path, run_id: str, payload: dict[str, Any]) -> None:
    journal = _journal_path(base, run_id)
    tmp = journal.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        json.dump(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(journal)
    _fsync_dir(journal.parent)


def _roll_forward_lake(
    base: Path,
    payload: dict[str, Any],
    save_state: Callable[[dict[str, Any], str], None],
    committer: Committer,
    *,
    recovering: bool,
    on_audit: Callable[[list[dict[str, Any]]], None] | None = None,
) -> dict[str, Any]:
    run_id = str(payload["run_id"])
    staging = staging_root(base) / run_id
    files = [LakeFile(str(f["path"]), int(f["rows"]), int(f["bytes"])) for f in payload["files"]]
    state = payload.get("state")
    found = committer.find(run_id) if recovering else None
    if found is not None:
        # Committed before the crash: never again. The state is the one the commit recorded.
        log.warning(
            "run %s had committed to %s before it was interrupted; saving its state only",
            run_id,
            committer.describe().get("table") or committer.describe().get("location"),
        )
        detail = {**committer.describe(), "committed": True, **found.detail}
        state = found.state if found.state is not None else state
    else:
        detail = committer.commit(staging, files, run_id, state)
    _append_audit(payload, on_audit)
    if state is not None:
        save_state(state, run_id)
    _journal_path(base, run_id).unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    return detail


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover(
    target: Path,
    *,
    job: str,
    is_alive: Callable[[str], bool],
    save_state: Callable[[dict[str, Any], str], None],
    committer: Committer | None = None,
) -> list[str]:
    """Finish publications interrupted by a crash and delete staging of dead runs.

    `committer` rolls lake journals forward (those of `publish_lake`); a local target has none.
    Returns the run ids whose publication was rolled forward.
    """
    root = staging_root(target)
    if not root.is_dir():
        return []
    rolled = []
    for journal in sorted(root.glob("*.publish.json")):
        run_id = journal.name.removesuffix(".publish.json")
        if is_alive(run_id):
            continue
        try:
            payload = json.loads(journal.read_text())
        except (OSError, ValueError):
            log.error("unreadable publish journal %s; leaving it for inspection", journal)
            continue
        if payload.get("job") != job:
            continue
        kind = payload.get("kind")
        if kind is not None and (committer is None or committer.kind != kind):
            log.error(
                "publish journal %s is for a %s target, which this job no longer has; leaving "
                "it for inspection",
                journal,
                kind,
            )
            continue
        log.warning("finishing the publication of run %s, interrupted earlier", run_id)
        if committer is not None and kind is not None:
            _roll_forward_lake(target, payload, save_state, committer, recovering=True)
        else:
            _roll_forward(target, payload, save_state)
        rolled.append(run_id)
    for entry in root.iterdir():
        if entry.is_dir() and not entry.is_symlink() and not is_alive(entry.name):
            if not _journal_path(target, entry.name).exists():
                shutil.rmtree(entry, ignore_errors=True)
        elif entry.suffix == ".tmp":
            with contextlib.suppress(OSError):
                entry.unlink()
    return rolled
