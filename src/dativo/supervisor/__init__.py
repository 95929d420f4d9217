"""The supervisor: runs one job, moving validated Arrow batches from reader to writer.

It owns the run's lifecycle: preflight (engine, limits, leftovers), one hardened container per
plugin, handshakes with deadlines, the relay with backpressure, validation of every batch,
publication of staged output, state, and cleanup whatever happens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import queue
import re
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from dativo import lake
from dativo.config import JobConfig, format_size
from dativo.errors import DativoError, InternalError, PluginError, ProtocolError
from dativo.keys import KeyService, key_service_for
from dativo.keys._parquet import ALGORITHM, EncryptedFile, inspect_encrypted
from dativo.protocol import IpcFormatError, inspect_message, v1
from dativo.protocol.keys import BROKER_SOCKET
from dativo.sandbox import Engine, ExitInfo, RunDirectory, runtime_base
from dativo.sandbox._rundir import is_run_alive
from dativo.signing import VerifiedPlugin, record_seen
from dativo.state import StateStore
from dativo.supervisor import _network, _publish
from dativo.supervisor._audit import record_hash
from dativo.supervisor._keybroker import KeyBroker
from dativo.supervisor._plugins import (
    SOCKET_MOUNT,
    Launch,
    PluginProcess,
    resolve,
    start_container,
    start_thread,
    verify_launch,
)

__all__ = ["Progress", "RunOptions", "RunReport", "run_job"]

log = logging.getLogger(__name__)
plugin_log = logging.getLogger("dativo.plugin")

_MAX_BATCH_ROWS = 1 << 26
_LOG_BURST = 200
_LOG_PER_SECOND = 50.0
_SHUTDOWN_GRACE = 10.0


@dataclass(frozen=True)
class Progress:
    """Counters passed to the progress callback after each batch."""

    rows: int
    bytes: int
    batches: int
    seconds: float


@dataclass(frozen=True)
class RunOptions:
    """How to run a job.

    Attributes:
        in_process: UNSANDBOXED trusted mode: plugins run in threads of this process.
        progress: called after each batch (from the relay thread).
        on_start: called with each started plugin (tests inspect containers through it).
    """

    in_process: bool = False
    progress: Callable[[Progress], None] | None = None
    on_start: Callable[[PluginProcess], None] | None = None


@dataclass
class RunReport:
    """The outcome of one run; `to_json` is what `dativo run --json` writes."""

    run_id: str
    job: str
    status: str = "running"
    rows: int = 0
    bytes: int = 0
    batches: int = 0
    seconds: float = 0.0
    stream_seconds: float = 0.0
    files: list[dict[str, Any]] = field(default_factory=list)
    state_saved: bool = False
    recovered_runs: list[str] = field(default_factory=list)
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)
    writer_metadata: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    sandboxed: bool = True
    signed: bool = False
    reaped_containers: list[str] = field(default_factory=list)
    commit: dict[str, Any] | None = None
    commit_seconds: float | None = None
    encryption: dict[str, Any] | None = None
    audit: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "job": self.job,
            "status": self.status,
            "sandboxed": self.sandboxed,
            "signed": self.signed,
            "rows": self.rows,
            "bytes": self.bytes,
            "batches": self.batches,
            "seconds": round(self.seconds, 3),
            "stream_seconds": round(self.stream_seconds, 3),
            "rows_per_second": round(self.rows / self.seconds) if self.seconds else None,
            "files": self.files,
            "state_saved": self.state_saved,
            "recovered_runs": self.recovered_runs,
            "reaped_containers": self.reaped_containers,
            "commit": self.commit,
            "commit_seconds": None
            if self.commit_seconds is None
            else round(self.commit_seconds, 4),
            "plugins": self.plugins,
            "writer_metadata": self.writer_metadata,
            "encryption": self.encryption,
            "audit": self.audit,
            "audit_head": record_hash(self.audit[-1]) if self.audit else None,
            "error": self.error,
        }


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)


class _Cancelled(Exception):
    """Raised inside blocking socket calls when the run must stop."""


class _Session:
    """One plugin's connection and the bookkeeping around it."""

    def __init__(
        self,
        launch: Launch,
        process: PluginProcess,
        channel: v1.Channel | None = None,
        started: float | None = None,
    ) -> None:
        self.launch = launch
        self.process = process
        self._channel = channel
        # The wall clock runs from the container's start, not from the handshake.
        self.deadline = (started or time.monotonic()) + launch.spec.resources.timeout
        self.hello: v1.Hello | None = None
        self._tokens = float(_LOG_BURST)
        self._last = time.monotonic()
        self.dropped_logs = 0
        # The kernel's limit counters, sampled while the container lives (its cgroup goes
        # with it), so a breach is known even when the plugin exits right after.
        self.counters: dict[str, int] = {}
        self._sampled = 0.0

    @property
    def name(self) -> str:
        return self.launch.name

    @property
    def channel(self) -> v1.Channel:
        assert self._channel is not None
        return self._channel

    def error(self, message: str, rule: str, hint: str | None = None) -> PluginError:
        logs = self.process.logs()
        return PluginError(
            _printable(self.launch.redact(message)),
            plugin=self.name,
            role=self.launch.role,  # type: ignore[arg-type]
            rule=rule,
            hint=hint,
            logs=self.launch.redact(logs) if logs else None,
        )

    def timeout_error(self) -> PluginError:
        breach = self.breach()
        if breach is not None:
            return breach
        limit, cpus = self.launch.spec.resources.timeout, self.launch.spec.resources.cpus
        resources = f"{self.launch.field_path}.resources"
        elapsed = time.monotonic() - (self.deadline - limit)
        used = self.counters.get("cpu_usage_usec", 0) / 1e6 / max(elapsed, 1e-3)
        if used >= 0.8 * cpus:
            throttled, periods = (
                self.counters.get("nr_throttled", 0),
                self.counters.get("nr_periods"),
            )
            return self.error(
                f"ran longer than its wall-clock limit of {limit:g} s, CPU-bound: it used "
                f"{used:.2f} CPU of its quota of {cpus:g} (throttled in {throttled} of {periods} "
                "scheduling periods)",
                "timeout",
                f"raise `{resources}.timeout`, or `{resources}.cpus`, if the work is "
                "legitimately long",
            )
        return self.error(
            f"ran longer than its wall-clock limit of {limit:g} s",
            "timeout",
            f"raise `{resources}.timeout` if the work is legitimately long",
        )

    def idle_error(self, idle: float) -> PluginError:
        breach = self.breach()
        if breach is not None:
            return breach
        return self.error(
            f"sent nothing for {idle:g} s (the idle limit); it looks hung",
            "timeout",
            "raise `run.idle_timeout` if the source is legitimately slow to produce data",
        )

    def log(self, message: v1.Log) -> None:
        now = time.monotonic()
        self._tokens = min(_LOG_BURST, self._tokens + (now - self._last) * _LOG_PER_SECOND)
        self._last = now
        if self._tokens < 1:
            if self.dropped_logs == 0:
                log.warning(
                    "%s plugin `%s` logs faster than %g messages/s; dropping the excess",
                    self.launch.role,
                    self.name,
                    _LOG_PER_SECOND,
                )
            self.dropped_logs += 1
            return
        self._tokens -= 1
        level = getattr(logging, message.level.upper(), logging.INFO)
        text = _printable(self.launch.redact(message.message)[:2000])
        plugin_log.log(level, "[%s] %s", self.launch.role, text)

    def report_dropped_logs(self) -> None:
        if self.dropped_logs:
            log.warning(
                "%s plugin `%s`: dropped %d log messages over the rate limit (burst %d, then %g/s)",
                self.launch.role,
                self.name,
                self.dropped_logs,
                _LOG_BURST,
                _LOG_PER_SECOND,
            )

    def watching(self, check: Callable[[], None]) -> Callable[[], None]:
        """`check`, also sampling the container's limit counters about once a second."""

        def watch() -> None:
            self.sample()
            check()

        return watch

    def sample(self, *, now: bool = False) -> None:
        """Read the container's cgroup counters and keep the highest value of each."""
        container = getattr(self.process, "container", None)
        if container is None or (not now and time.monotonic() - self._sampled < 1.0):
            return
        self._sampled = time.monotonic()
        for key, value in container.cgroup_counters().items():
            self.counters[key] = max(value, self.counters.get(key, 0))

    def breach(self) -> PluginError | None:
        """The memory or process limit the plugin ran into, if any, as the error to report.

        Any process of the container counts: a child can be OOM-killed, or forks refused,
        while the plugin's main process carries on as if nothing happened.
        """
        self.sample(now=True)
        resources = self.launch.spec.resources
        field_path = self.launch.field_path
        info = self.process.exit_info()
        container = getattr(self.process, "container", None)
        if (
            (info is not None and info.oom_killed)
            or self.counters.get("oom_kill", 0) > 0
            or (container is not None and container.oom_events() > 0)
        ):
            return self.error(
                f"memory limit {format_size(resources.memory)} exceeded (OOM killed)",
                "memory",
                f"raise `{field_path}.resources.memory` (now {format_size(resources.memory)})",
            )
        refused = self.counters.get("pids_max", 0)
        if refused:
            return self.error(
                f"process limit {resources.pids} reached ({refused} process or thread creations "
                "refused)",
                "pids",
                f"raise `{field_path}.resources.pids` (now {resources.pids})",
            )
        return None

    def diagnose(self, what: str) -> PluginError:
        """Explain why the plugin stopped talking: OOM, a crash, a kill."""
        info: ExitInfo | None = self.process.wait(5.0)
        breach = self.breach()
        if breach is not None:
            return breach
        if info is None:
            return self.error(f"{what}, and the plugin is still running", "protocol")
        if info.status > 128 and info.status - 128 in _SIGNALS:
            name = _SIGNALS[info.status - 128]
            return self.error(
                f"{what}: the plugin was killed ({name}, exit {info.status})", "crash"
            )
        return self.error(f"{what}: the plugin exited with status {info.status}", "crash")

    def from_error_message(self, message: v1.Error) -> PluginError:
        breach = self.breach()
        if breach is not None:
            said = self.launch.redact(message.message)
            breach.message += f"; then the plugin reported: {_printable(said[:500])}"
            return breach
        hint = f"fix `{self.launch.field_path}.config`" if message.category == "config" else None
        error = self.error(message.message, message.category, hint)
        error.transient = message.transient
        if message.detail:
            log.debug(
                "%s plugin traceback:\n%s",
                self.launch.role,
                _printable(self.launch.redact(message.detail), keep_newlines=True),
            )
        return error


_SIGNALS = {int(s): s.name for s in signal.Signals}
# C0 and C1 controls (newline included: one message is one line) and the Unicode marks that
# reorder text; a plugin could otherwise move the cursor, recolour or forge lines on a terminal.
_UNPRINTABLE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_UNPRINTABLE_KEEP_LINES = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)


def _printable(text: str, *, keep_newlines: bool = False) -> str:
    """`text` with every control character escaped (`\\x1b`), safe to print to a terminal."""
    pattern = _UNPRINTABLE_KEEP_LINES if keep_newlines else _UNPRINTABLE
    return pattern.sub(lambda m: repr(m.group())[1:-1], text)


def run_job(job: JobConfig, options: RunOptions | None = None) -> RunReport:
    """Run `job` once and return its report; raise a DativoError if it failed.

    Whatever happens, every container, socket and staging directory of the run is removed, and
    output and state are committed only if the run succeeded.
    """
    options = options or RunOptions()
    run_id = new_run_id()
    report = RunReport(run_id=run_id, job=job.name, sandboxed=not options.in_process)
    started = time.monotonic()
    started_wall = time.time()
    store = StateStore(job.state_path)
    try:
        _Run(job, options, report, store).execute()
        report.status = "succeeded"
    except DativoError as exc:
        report.status = "failed"
        report.error = _error_json(exc)
        raise
    except KeyboardInterrupt:
        report.status = "interrupted"
        raise
    finally:
        report.seconds = time.monotonic() - started
        try:
            store.record_run(run_id, job.name, started_wall, report.status, report.to_json())
        except Exception:
            log.warning("could not record run %s in the history", run_id, exc_info=True)
    return report


def _error_json(exc: DativoError) -> dict[str, Any]:
    data: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, PluginError):
        data.update(role=exc.role, plugin=exc.plugin, rule=exc.rule, hint=exc.hint)
    data["transient"] = exc.transient
    return data


class _Run:
    def __init__(
        self, job: JobConfig, options: RunOptions, report: RunReport, store: StateStore
    ) -> None:
        self.job = job
        self.options = options
        self.report = report
        self.store = store
        self.run_id = report.run_id
        self.processes: list[PluginProcess] = []
        self.sessions: list[_Session] = []
        self.channels: list[v1.Channel] = []
        self.end_sent = False
        self.failure: DativoError | None = None
        self.failed = threading.Event()
        self.verified: dict[str, VerifiedPlugin] = {}
        self.networks: dict[str, _network.PluginNetwork] = {}
        self.committer: lake.Committer | None = None
        self.keys: KeyService | None = None
        self.broker: KeyBroker | None = None
        self.encrypted: dict[str, EncryptedFile] = {}

    def _save_state(self, state: dict[str, Any], run_id: str) -> None:
        self.store.save(self.job.name, state, run_id)
        self.report.state_saved = True

    def execute(self) -> None:
        job = self.job
        base = runtime_base()
        engine: Engine | None = None
        if not self.options.in_process:
            engine = Engine()
            self.report.reaped_containers = engine.reap(base)
        else:
            log.warning(
                "UNSANDBOXED: plugins run inside this process with your privileges; "
                "use this only for plugins you wrote yourself"
            )
        # A local Parquet target stages inside itself; lake targets (Iceberg, S3) stage under
        # the job's directory and commit through a committer holding the credentials.
        target = job.staging_base
        self.committer = lake.committer_for(job)  # an Iceberg one warms up in the background
        if target is not None:
            target.mkdir(parents=True, exist_ok=True)
            self.report.recovered_runs = _publish.recover(
                target,
                job=job.name,
                is_alive=lambda rid: is_run_alive(base / rid),
                save_state=self._save_state,
                committer=self.committer,
            )
        rundir = RunDirectory(base, self.run_id)
        staging: Path | None = None
        try:
            if target is not None:
                user = job.target.writer.isolation.user
                staging = _publish.create_staging(target, self.run_id, user)
            reader = resolve(job, "reader", None)
            writer = resolve(job, "writer", staging)
            # Every master key is checked before any container starts: a missing, revoked or
            # unreachable key fails the run with nothing written.
            self._open_keys()
            images: dict[str, str] = {}
            if engine is not None:
                # Both images are verified before any container (even the probe) starts, and
                # from here on each is named by its verified ID only, never by a tag.
                reader = self._verify(engine, reader)
                writer = self._verify(engine, writer)
            # Every grant is resolved and pinned before any container (even the probe) starts.
            pinned = {launch.role: self._pin_network(launch) for launch in (reader, writer)}
            if engine is not None:
                for launch in (reader, writer):
                    images[launch.role] = self.verified[launch.role].image_id
                    engine.verify_limits(
                        images[launch.role],
                        user=launch.spec.isolation.user,
                        runtime=launch.spec.isolation.runtime,
                    )
            sessions = {}
            for launch in (reader, writer):
                directory, listener = rundir.listen(launch.role)
                if launch.role == "writer" and self.keys is not None:
                    launch = self._open_broker(launch, directory, in_process=engine is None)
                if engine is not None:
                    process: PluginProcess = start_container(
                        engine,
                        launch,
                        image_id=images[launch.role],
                        run_id=self.run_id,
                        run_dir=rundir.path,
                        socket_dir=directory,
                        network=self._open_network(launch, directory, pinned[launch.role]),
                    )
                else:
                    process = start_thread(launch, directory / "plugin.sock")
                self.processes.append(process)
                if self.options.on_start:
                    self.options.on_start(process)
                sessions[launch.role] = (launch, process, listener, time.monotonic())
            reader_session = self._handshake(*sessions["reader"])
            writer_session = self._handshake(*sessions["writer"])
            self._relay(reader_session, writer_session, staging)
            self._record_versions()
        except BaseException as exc:
            for process in self.processes:
                process.stop()
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            self._note_network(exc)
            failure = self.broker.failure if self.broker is not None else None
            if failure is not None and isinstance(exc, DativoError) and exc is not failure:
                # The writer only relays it; the key service's own error names key and service.
                raise failure from None
            raise
        finally:
            if self.broker is not None:
                self.broker.close()
                if self.report.encryption is not None:
                    self.report.encryption["broker"] = self.broker.report()
            if self.keys is not None:
                self.keys.close()
            for channel in self.channels:
                channel.close()
            for process in self.processes:
                process.stop()
                role = process.launch.role
                self.report.plugins[role] = {
                    **self.report.plugins.get(role, {}),
                    **process.describe(),
                }
            for session in self.sessions:
                peak = session.counters.get("memory_peak")
                if peak is not None:  # the container's high-water mark, as last sampled
                    self.report.plugins[session.launch.role]["peak_memory_bytes"] = peak
            for role, network in self.networks.items():
                network.close()
                self.report.plugins.setdefault(role, {})["network"] = network.report()
            rundir.close()
            if self.committer is not None:
                self.committer.close()

    def _open_keys(self) -> None:
        """Set up the job's key service and check each master key may wrap (preflight)."""
        spec = self.job.target.encryption
        if spec is None:
            return
        self.keys = key_service_for(self.job)
        versions = [self.keys.check(key_id) for key_id in spec.key_ids()]
        self.report.encryption = {
            "algorithm": ALGORITHM,
            "service": self.keys.describe(),
            "footer_key": spec.footer_key,
            "column_keys": {k: list(v) for k, v in spec.column_keys.items()},
            "current_versions": [{"key_id": v.key_id, "version": v.version} for v in versions],
        }
        for version in versions:
            log.info(
                "encryption: master key `%s` is at version %s", version.key_id, version.version
            )

    def _open_broker(self, launch: Launch, directory: Path, *, in_process: bool) -> Launch:
        """Bind the key broker in the writer's socket directory; tell the writer where."""
        spec = self.job.target.encryption
        assert spec is not None
        assert self.keys is not None
        self.broker = KeyBroker(self.keys, spec.key_ids(), directory)
        self.broker.start()
        socket_path = str(self.broker.path) if in_process else f"{SOCKET_MOUNT}/{BROKER_SOCKET}"
        settings = {
            "socket": socket_path,
            "footer_key": spec.footer_key,
            "column_keys": {k: list(v) for k, v in spec.column_keys.items()},
        }
        return dataclasses.replace(launch, config={**launch.config, "encryption": settings})

    def _inspect_encrypted(self, fd: int, path: str) -> int:
        """Check one staged file is encrypted as the job says; remember it for the audit."""
        spec = self.job.target.encryption
        assert spec is not None
        assert self.keys is not None
        owners = {column: key for key, columns in spec.column_keys.items() for column in columns}
        found = inspect_encrypted(
            fd, path, self.keys, footer_key=spec.footer_key, column_keys=owners
        )
        self.encrypted[path] = found
        return found.rows

    def _audit_records(self, files: list[_publish.StagedFile]) -> list[dict[str, Any]]:
        assert self.keys is not None
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        records = []
        for staged in files:
            found = self.encrypted[staged.path]
            records.append(
                {
                    "run_id": self.run_id,
                    "job": self.job.name,
                    "time": now,
                    "file": staged.path,
                    "rows": staged.rows,
                    "bytes": staged.bytes,
                    "sha256": found.sha256,
                    "algorithm": ALGORITHM,
                    "key_service": self.keys.name,
                    "footer_key": found.footer.to_json(),
                    "columns": {name: key.to_json() for name, key in found.columns.items()},
                }
            )
        return records

    def _set_audit(self, chained: list[dict[str, Any]]) -> None:
        self.report.audit = chained

    def _verify(self, engine: Engine, launch: Launch) -> Launch:
        """Verify the plugin's image against the trust policy; raise before anything starts."""
        assert launch.image is not None
        launch, verified = verify_launch(launch, engine.image(launch.image))
        self.verified[launch.role] = verified
        self.report.plugins[launch.role] = {"plugin": launch.name, **verified.report()}
        self.report.signed = all(v.signed for v in self.verified.values())
        if not verified.signed:
            log.warning(
                "!! UNSIGNED: %s plugin `%s` (image %s) has no valid signature and runs only "
                "because `allow_unsigned_local` is on in the trust policy",
                launch.role,
                launch.name,
                verified.image_id[:19],
            )
        return launch

    def _pin_network(self, launch: Launch) -> tuple[_network.Pinned, ...]:
        """Resolve and pin the plugin's granted destinations (before any container starts)."""
        granted = launch.spec.network
        if not granted:
            return ()
        shown = ", ".join(f"`{d}`" for d in granted)
        if self.options.in_process:
            log.warning(
                "UNSANDBOXED: %s plugin `%s` has this process's own network; its grants (%s) "
                "are not enforced",
                launch.role,
                launch.name,
                shown,
            )
            return ()
        verified = self.verified.get(launch.role)
        if verified is not None and verified.manifest is None:
            log.warning(
                "!! UNSIGNED: %s plugin `%s` is local code with no manifest; its network grants "
                "(%s) come from the job file alone",
                launch.role,
                launch.name,
                shown,
            )
        return _network.pin(granted, field_path=launch.field_path)

    def _open_network(
        self, launch: Launch, directory: Path, pinned: tuple[_network.Pinned, ...]
    ) -> _network.PluginNetwork | None:
        """Bind the plugin's forwarded sockets in its socket directory and start forwarding."""
        if not pinned:
            return None
        network = _network.PluginNetwork(
            pinned, directory, role=launch.role, plugin=launch.name, container_root=SOCKET_MOUNT
        )
        self.networks[launch.role] = network
        network.start()
        for item in pinned:
            log.info(
                "%s plugin `%s`: granted `%s`, pinned to %s",
                launch.role,
                launch.name,
                item.destination,
                item.shown,
            )
        return network

    def _note_network(self, exc: BaseException) -> None:
        """Name the granted destination that failed in the plugin's error, if one did."""
        if not isinstance(exc, PluginError) or exc.role not in self.networks:
            return
        note = self.networks[exc.role].failure_note()
        if note is not None:
            exc.message += f"; {note}"
            if exc.hint is None:
                exc.hint = "check that the granted destination is up and reachable from this host"

    def _record_versions(self) -> None:
        """Remember the version of each signed plugin just run (rollback protection)."""
        for verified in self.verified.values():
            if verified.signed and verified.manifest is not None:
                try:
                    record_seen(verified.manifest.name, verified.manifest.version)
                except (OSError, DativoError):
                    log.warning(
                        "could not record %s %s as seen; rollback protection does not know it",
                        verified.manifest.name,
                        verified.manifest.version,
                        exc_info=True,
                    )

    def _handshake(
        self, launch: Launch, process: PluginProcess, listener: Any, started: float
    ) -> _Session:
        timeout = self.job.run.handshake_timeout
        deadline = time.monotonic() + timeout
        listener.settimeout(0.2)
        while True:
            try:
                sock, _ = listener.accept()
                break
            except TimeoutError:
                if process.exit_info() is not None:
                    raise _Session(launch, process).diagnose("exited before connecting") from None
                if time.monotonic() > deadline:
                    raise PluginError(
                        f"did not connect within the handshake timeout of {timeout:g} s",
                        plugin=launch.name,
                        role=launch.role,  # type: ignore[arg-type]
                        rule="handshake",
                        hint="raise `run.handshake_timeout`, or check the plugin's entrypoint",
                        logs=process.logs() or None,
                    ) from None
        listener.close()  # one connection per plugin, ever
        channel = v1.Channel(sock, max_frame_bytes=self.job.run.max_frame_bytes)
        self.channels.append(channel)
        session = _Session(launch, process, channel, started)
        self.sessions.append(session)
        try:
            hello = session.channel.recv_control(deadline=deadline)
        except TimeoutError:
            raise session.error(
                f"connected but sent no hello within {timeout:g} s",
                "handshake",
                "raise `run.handshake_timeout`, or check that the plugin speaks protocol v1",
            ) from None
        except v1.PeerClosed:
            raise session.diagnose("closed the connection before saying hello") from None
        except ProtocolError as exc:
            raise session.error(
                f"broke the protocol during the handshake: {exc}", "protocol"
            ) from None
        if not isinstance(hello, v1.Hello):
            raise session.error(f"sent `{hello.type}` instead of `hello`", "protocol")
        if v1.PROTOCOL_VERSION not in hello.protocols:
            session.channel.send(
                v1.Error(category="protocol", message="this supervisor speaks protocol 1 only")
            )
            raise session.error(
                f"speaks protocol versions {hello.protocols}; this supervisor speaks 1",
                "protocol",
                "use a plugin built for protocol v1",
            )
        if hello.role != launch.role:
            raise session.error(
                f"is a {hello.role} but is configured as the {launch.role}",
                "protocol",
                f"use a {launch.role} plugin in `{launch.field_path}`",
            )
        session.hello = hello
        state = self.store.get(self.job.name) if launch.role == "reader" else None
        init = v1.Init(
            protocol=v1.PROTOCOL_VERSION,
            run_id=self.run_id,
            config=dict(launch.config),
            state=state,
            batch_size=self.job.run.batch_size,
            max_frame_bytes=self.job.run.max_frame_bytes,
        )
        try:
            session.channel.send(init, deadline=deadline)
        except v1.PeerClosed:
            # It hung up right after hello; an `error` it sent first explains why.
            raise self._last_words(session, "closed the connection before `init`") from None
        except TimeoutError:
            raise session.error(f"did not read `init` within {timeout:g} s", "handshake") from None
        return session

    @staticmethod
    def _last_words(session: _Session, what: str) -> PluginError:
        """The `error` a plugin sent before hanging up, or a diagnosis of its exit."""
        try:
            while True:
                message = session.channel.recv_control(deadline=time.monotonic() + 2.0)
                if isinstance(message, v1.Error):
                    return session.from_error_message(message)
                if isinstance(message, v1.Log):
                    session.log(message)
        except (DativoError, TimeoutError):
            pass
        return session.diagnose(what)

    def _check(self, session: _Session) -> Callable[[], None]:
        def check() -> None:
            if self.failed.is_set():
                raise _Cancelled
            if time.monotonic() > session.deadline:
                raise session.timeout_error()

        return check

    def _relay(self, reader: _Session, writer: _Session, staging: Path | None) -> None:
        reader.channel._check = reader.watching(self._check(reader))
        writer.channel._check = writer.watching(self._check(writer))
        results: queue.Queue[v1.ControlMessage | DativoError] = queue.Queue()
        listener = threading.Thread(
            target=self._listen_writer, args=(writer, results), name="dativo-writer", daemon=True
        )
        # The writer must be ready before any data flows.
        first = self._recv_writer_control(writer)
        if not isinstance(first, v1.Ready):
            raise writer.error(f"sent `{first.type}` instead of `ready`", "protocol")
        listener.start()
        try:
            end = self._pump(reader, writer)
            try:
                self.end_sent = True
                writer.channel.send(v1.End())
            except v1.PeerClosed:
                raise self._writer_gone(writer) from None
            result = self._await(results, writer, v1.Result)
            breach = writer.breach()  # still running: its counters are readable
            if breach is not None:
                raise breach
        except _Cancelled:
            _report_dropped_logs(reader, writer)
            assert self.failure is not None
            raise self.failure from None
        except BaseException as exc:
            _report_dropped_logs(reader, writer)
            self._abort(writer, str(exc))
            raise
        # Both plugins are done: let them close, and wait for them to exit.
        for session in (reader, writer):
            with contextlib.suppress(DativoError):
                session.channel.send(v1.Shutdown())
        self._await(results, writer, v1.Bye, timeout=_SHUTDOWN_GRACE, required=False)
        for session in (reader, writer):
            if session.process.wait(_SHUTDOWN_GRACE) is None:
                log.warning("%s did not exit after shutdown; killing it", session.name)
            session.channel.close()
        _report_dropped_logs(reader, writer)
        # A process of either plugin may have been OOM-killed while its main process carried
        # on; the engine knows once the container has exited. Nothing is published then.
        for session in (reader, writer):
            breach = session.breach()
            if breach is not None:
                raise breach
        assert isinstance(result, v1.Result)
        self.report.writer_metadata = dict(result.metadata)
        base = self.job.staging_base
        if staging is not None and base is not None:
            writer.process.stop()  # nothing may change the staging directory from now on
            files = _publish.validate_staged(
                staging,
                list(result.files),
                rows_sent=self.report.rows,
                plugin=writer.name,
                inspect=self._inspect_encrypted if self.keys is not None else None,
            )
            audit = self._audit_records(files) if self.keys is not None else None
            committing = time.monotonic()
            if self.committer is not None:
                self.report.commit = _publish.publish_lake(
                    base,
                    self.run_id,
                    files,
                    job=self.job.name,
                    state=end.state,
                    save_state=self._save_state,
                    committer=self.committer,
                    audit=audit,
                    on_audit=self._set_audit,
                )
            else:
                _publish.publish(
                    base,
                    self.run_id,
                    files,
                    job=self.job.name,
                    state=end.state,
                    save_state=self._save_state,
                    audit=audit,
                    on_audit=self._set_audit,
                )
            self.report.commit_seconds = time.monotonic() - committing
            self.report.files = [
                {"path": f.path, "rows": f.rows, "bytes": f.bytes, "partition": f.partition}
                for f in files
            ]
        elif end.state is not None:
            self._save_state(end.state, self.run_id)

    def _recv_writer_control(self, writer: _Session) -> v1.ControlMessage:
        while True:
            try:
                message = writer.channel.recv_control(deadline=writer.deadline)
            except v1.PeerClosed:
                raise writer.diagnose("closed the connection") from None
            except TimeoutError:
                raise writer.timeout_error() from None
            except ProtocolError as exc:
                raise writer.error(f"broke the protocol: {exc}", "protocol") from None
            if isinstance(message, v1.Log):
                writer.log(message)
                continue
            if isinstance(message, v1.Error):
                raise writer.from_error_message(message)
            return message

    def _listen_writer(self, writer: _Session, results: queue.Queue[Any]) -> None:
        """Drain the writer's messages so its logs never block it; surface failures."""
        try:
            while True:
                message = self._recv_writer_control(writer)
                if not isinstance(message, v1.Result | v1.Bye) or not self.end_sent:
                    raise writer.error(f"sent `{message.type}` while receiving batches", "protocol")
                results.put(message)
                if isinstance(message, v1.Bye):
                    return
        except _Cancelled:
            return
        except DativoError as exc:
            self._fail(exc)
            results.put(exc)
        except Exception as exc:
            error = InternalError(f"writer listener failed: {exc!r}")
            self._fail(error)
            results.put(error)

    def _fail(self, error: DativoError) -> None:
        if self.failure is None:
            self.failure = error
        self.failed.set()

    def _await(
        self,
        results: queue.Queue[Any],
        writer: _Session,
        kind: type[v1.Result] | type[v1.Bye],
        *,
        timeout: float | None = None,
        required: bool = True,
    ) -> v1.ControlMessage | None:
        deadline = writer.deadline if timeout is None else time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if not required:
                    return None
                raise writer.timeout_error()
            try:
                message = results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if isinstance(message, DativoError):
                if not required:
                    return None
                raise message
            if isinstance(message, kind):
                return message
            if required:
                expected = kind.model_fields["type"].default
                raise writer.error(f"sent `{message.type}` instead of `{expected}`", "protocol")

    def _abort(self, writer: _Session, reason: str) -> None:
        with contextlib.suppress(BaseException):
            writer.channel.send(v1.Abort(reason=reason[:500]), deadline=time.monotonic() + 2)

    def _pump(self, reader: _Session, writer: _Session) -> v1.End:
        """Relay reader -> writer until `end`; validate every Arrow message on the way."""
        started = time.monotonic()
        prefetch = _Prefetch(reader, self.job.run.idle_timeout)
        sender = _Sender(self, writer, prefetch)
        try:
            end = self._pump_frames(reader, writer, prefetch, sender, started)
            sender.drain()
            return end
        finally:
            sender.close()
            prefetch.close()

    def _pump_frames(
        self,
        reader: _Session,
        writer: _Session,
        prefetch: _Prefetch,
        sender: _Sender,
        started: float,
    ) -> v1.End:
        schema: pa.Schema | None = None
        report = self.report
        progress = self.options.progress
        check = prefetch.check
        limits = self.job.run
        nodes = 0  # field nodes of the declared schema, nested fields included
        while True:
            # Between frames too: a plugin that never pauses must still meet its deadline,
            # and a writer failure must stop the relay at once.
            check()
            if time.monotonic() > writer.deadline:
                raise writer.timeout_error()
            try:
                kind, payload, slot = prefetch.next(writer)
            except v1.PeerClosed:
                raise reader.diagnose("closed the connection before `end`") from None
            except TimeoutError:
                if time.monotonic() > reader.deadline:
                    raise reader.timeout_error() from None
                raise reader.idle_error(limits.idle_timeout) from None
            except ProtocolError as exc:
                raise reader.error(f"broke the protocol: {exc}", "protocol") from None
            if kind == v1.KIND_CONTROL:
                try:
                    message = v1.decode_control(payload)
                except ProtocolError as exc:
                    raise reader.error(f"broke the protocol: {exc}", "protocol") from None
                del payload
                prefetch.release(slot)
                if isinstance(message, v1.Log):
                    reader.log(message)
                elif isinstance(message, v1.Checkpoint):
                    pass  # v1 commits the final state only, after the writer's files are published
                elif isinstance(message, v1.Error):
                    raise reader.from_error_message(message)
                elif isinstance(message, v1.End):
                    if schema is None:
                        raise reader.error("sent `end` before its schema", "protocol")
                    breach = reader.breach()  # still running: its counters are readable
                    if breach is not None:
                        raise breach
                    try:
                        # The state is saved and handed back in the next run's `init`: refuse
                        # now what could not be sent then, rather than break every later run.
                        v1.encode_control(
                            v1.Init(
                                protocol=v1.PROTOCOL_VERSION,
                                run_id=self.run_id,
                                config=dict(reader.launch.config),
                                state=message.state,
                                batch_size=limits.batch_size,
                                max_frame_bytes=limits.max_frame_bytes,
                            )
                        )
                    except (ProtocolError, ValueError) as exc:
                        raise reader.error(
                            f"sent a final state that could not be given back to it in the next "
                            f"run's `init`: {str(exc)[:200]}",
                            "protocol",
                            "keep the reader's state small (a cursor, not data)",
                        ) from None
                    report.stream_seconds = time.monotonic() - started
                    return message
                else:
                    raise reader.error(f"sent `{message.type}` during the stream", "protocol")
                continue
            try:
                info = inspect_message(payload, max_rows=_MAX_BATCH_ROWS)
            except IpcFormatError as exc:
                raise reader.error(f"sent malformed Arrow IPC: {exc}", "arrow") from None
            buffer = pa.py_buffer(payload)
            if schema is None:
                if info.header_type != 1:
                    raise reader.error("sent a record batch before its schema", "protocol")
                schema = self._check_schema(reader, buffer)
                nodes = sum(_field_nodes(column.type) for column in schema)
                del buffer
                sender.send(payload, slot)
                del payload
                continue
            if info.header_type != 3:
                raise reader.error("sent a second schema in the same stream", "schema")
            if info.nodes != nodes:
                # pyarrow would silently ignore extra columns; fewer would fail less clearly.
                raise reader.error(
                    f"sent a record batch with {info.nodes} field nodes where its declared "
                    f"schema has {nodes}: columns added, dropped or nested differently",
                    "schema",
                )
            try:
                batch = pa.ipc.read_record_batch(pa.ipc.read_message(buffer), schema)
                _validate(batch)
            except Exception as exc:  # pyarrow raises ValueError, OSError, TypeError...
                raise reader.error(
                    "sent a record batch that does not match its declared schema: "
                    + _column_problem(str(exc), schema),
                    "schema",
                ) from None
            rows = batch.num_rows
            del batch, buffer  # release the reusable receive buffer before the next frame
            if limits.max_rows is not None and report.rows + rows > limits.max_rows:
                raise reader.error(
                    f"sent more than the {limits.max_rows:,} rows `run.max_rows` allows",
                    "limit",
                    "raise `run.max_rows` if the source really holds more",
                )
            if limits.max_bytes is not None and report.bytes + len(payload) > limits.max_bytes:
                raise reader.error(
                    f"sent more than the {format_size(limits.max_bytes)} of record batches "
                    "`run.max_bytes` allows",
                    "limit",
                    "raise `run.max_bytes` if the source really holds more",
                )
            size = len(payload)
            sender.send(payload, slot)
            del payload
            report.rows += rows
            report.bytes += size
            report.batches += 1
            if progress is not None:
                progress(
                    Progress(report.rows, report.bytes, report.batches, time.monotonic() - started)
                )

    def _forward(self, writer: _Session, payload: memoryview) -> None:
        try:
            writer.channel.send_buffers([v1.HEADER.pack(v1.KIND_ARROW, len(payload)), payload])
        except v1.PeerClosed:
            raise self._writer_gone(writer) from None

    def _writer_gone(self, writer: _Session) -> DativoError:
        """The writer hung up mid-stream; prefer the reason its listener thread received."""
        deadline = time.monotonic() + 2.0
        while self.failure is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.failure or writer.diagnose("closed the connection while receiving batches")

    @staticmethod
    def _check_schema(reader: _Session, buffer: pa.Buffer) -> pa.Schema:
        try:
            schema = pa.ipc.read_schema(buffer)
        except Exception as exc:  # pyarrow raises ValueError, OSError, TypeError...
            raise reader.error(f"sent an unreadable schema: {exc}", "schema") from None
        for column in schema:
            if _has_dictionary(column.type):
                raise reader.error(
                    f"column `{column.name}` is dictionary-encoded, which protocol v1 forbids",
                    "schema",
                    "decode dictionary columns in the reader",
                )
        if len(schema) == 0:
            raise reader.error("declared a schema with no columns", "schema")
        return schema


def _validate(batch: pa.RecordBatch) -> None:
    """Everything `validate(full=True)` checks, except decimal precision.

    Offsets, lengths, buffer sizes, null counts and UTF-8 are checked for every column, so no
    writer can be made to read out of bounds or decode invalid text. The precision check of
    decimal values (a third of the full cost on mixed data) is left to the writer: a decimal
    too wide for its declared precision is wrong data, not unsafe data.
    """
    for index, column in enumerate(batch.columns):
        try:
            column.validate(full=not pa.types.is_decimal(column.type))
        except pa.ArrowInvalid as exc:
            # The same shape as pyarrow's batch-level message, so `_column_problem` names it.
            raise pa.ArrowInvalid(f"In column {index}: Invalid: {exc}") from None
    batch.validate()


class _Stopped(Exception):
    """The prefetch thread was told to stop."""


def _interruptible(channel: v1.Channel, stop: threading.Event) -> Callable[[], None]:
    """Make the channel's blocking calls also end once `stop` is set; return its own check."""
    original = channel._check

    def check() -> None:
        if stop.is_set():
            raise _Stopped
        original()

    channel._check = check
    return original


# One frame being received, one being validated, one being sent: three buffers of one frame.
_RELAY_BUFFERS = 3


class _Sender:
    """Forwards validated frames to the writer from a thread of its own.

    Sending (a socket copy, without the GIL) overlaps the validation of the next frame; the
    queue holds one frame, so memory stays bounded. A frame's buffer goes back to the
    receiver only once the frame is sent.
    """

    def __init__(self, run: _Run, writer: _Session, prefetch: _Prefetch) -> None:
        self._run = run
        self._writer = writer
        self._prefetch = prefetch
        self._queue: queue.Queue[tuple[Any, int] | None] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._check = _interruptible(writer.channel, self._stop)
        self._thread = threading.Thread(target=self._loop, name="dativo-sender", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            payload, slot = item
            try:
                if self.error is None:
                    self._run._forward(self._writer, payload)
            except BaseException as exc:  # handed to the relay, which reports it
                self.error = exc
                if isinstance(exc, DativoError):
                    self._run._fail(exc)
            finally:
                del payload, item
                self._prefetch.release(slot)
                self._queue.task_done()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def send(self, payload: Any, slot: int) -> None:
        while True:
            self._raise()
            try:
                self._queue.put((payload, slot), timeout=0.25)
                return
            except queue.Full:
                self._check()

    def drain(self) -> None:
        """Wait until every frame handed over is sent."""
        while self._queue.unfinished_tasks:
            self._raise()
            self._check()
            time.sleep(0.005)
        self._raise()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=5.0)
        self._thread.join(5.0)
        self._writer.channel._check = self._check


class _Prefetch:
    """Receives the reader's next frame into a second buffer while the current one is relayed.

    Two reusable buffers, at most one received frame waiting: memory stays two frames, and the
    relay's validation overlaps the socket copies (which release the GIL) instead of taking
    turns with them.
    """

    def __init__(self, reader: _Session, idle_timeout: float) -> None:
        self._reader = reader
        self._idle_timeout = idle_timeout
        self._ready: queue.Queue[tuple[int, Any, int] | BaseException] = queue.Queue()
        self._free: queue.Queue[int] = queue.Queue()
        for slot in range(_RELAY_BUFFERS):
            self._free.put(slot)
        self._stop = threading.Event()
        self.check = _interruptible(reader.channel, self._stop)
        self._thread = threading.Thread(target=self._run, name="dativo-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        channel = self._reader.channel
        try:
            while True:
                slot = self._wait(self._free)
                # The idle clock starts only now: time blocked on a slow writer does not count.
                idle = time.monotonic() + self._idle_timeout
                kind, payload = channel.recv_frame(
                    deadline=min(self._reader.deadline, idle), reuse=True, slot=slot
                )
                self._ready.put((kind, payload, slot))
                if kind == v1.KIND_CONTROL and _ends_stream(payload):
                    return
        except _Stopped:
            return
        except BaseException as exc:  # handed to the relay, which reports it
            self._ready.put(exc)

    def _wait(self, source: queue.Queue[int]) -> int:
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                return source.get(timeout=0.25)
            except queue.Empty:
                continue

    def next(self, writer: _Session) -> tuple[int, Any, int]:
        """The next frame (kind, payload, slot); raises what the receiver ran into."""
        while True:
            self.check()
            if time.monotonic() > writer.deadline:
                raise writer.timeout_error()
            try:
                item = self._ready.get(timeout=0.25)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def release(self, slot: int) -> None:
        self._free.put(slot)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self._reader.channel._check = self.check


def _ends_stream(payload: Any) -> bool:
    """Whether a control frame from the reader is its last (`end` or `error`)."""
    try:
        message = v1.decode_control(payload)
    except ProtocolError:
        return True
    return isinstance(message, v1.End | v1.Error)


def _has_dictionary(arrow_type: pa.DataType) -> bool:
    if pa.types.is_dictionary(arrow_type):
        return True
    return any(_has_dictionary(arrow_type.field(i).type) for i in range(arrow_type.num_fields))


def _field_nodes(arrow_type: pa.DataType) -> int:
    """IPC field nodes of a column of this type: one, plus those of its children."""
    if isinstance(arrow_type, pa.BaseExtensionType):
        arrow_type = arrow_type.storage_type
    return 1 + sum(_field_nodes(arrow_type.field(i).type) for i in range(arrow_type.num_fields))


_IN_COLUMN = re.compile(r"In column (\d+): (.*)", re.DOTALL)


def _column_problem(problem: str, schema: pa.Schema) -> str:
    """pyarrow's `In column 1: ...` with the column's name and declared type instead."""
    match = _IN_COLUMN.match(problem)
    if match is None or int(match[1]) >= len(schema):
        return problem
    column = schema.field(int(match[1]))
    return f"column `{column.name}` (declared {column.type}): {match[2]}"


def _report_dropped_logs(*sessions: _Session) -> None:
    for session in sessions:
        session.report_dropped_logs()


def describe_error(exc: DativoError) -> str:
    """The diagnosis the CLI prints, with the plugin's last log lines where useful."""
    text = str(exc)
    if isinstance(exc, PluginError) and exc.logs and exc.rule in ("crash", "memory", "handshake"):
        # The plugin wrote these lines: escape control characters and cut long lines.
        tail = "\n".join(_printable(line)[:300] for line in exc.logs.strip().splitlines()[-15:])
        text += "\n  last log lines:\n    " + tail.replace("\n", "\n    ")
    return text
