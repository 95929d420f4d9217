"""The supervisor: runs one job, moving validated Arrow batches from reader to writer.

It owns the run's lifecycle: preflight (engine, limits, leftovers), one hardened container per
plugin, handshakes with deadlines, the relay with backpressure, validation of every batch,
publication of staged output, state, and cleanup whatever happens.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from dativo.config import JobConfig, format_size
from dativo.errors import DativoError, InternalError, PluginError, ProtocolError
from dativo.protocol import IpcFormatError, inspect_message, v1
from dativo.sandbox import Engine, ExitInfo, RunDirectory, runtime_base
from dativo.sandbox._rundir import is_run_alive
from dativo.state import StateStore
from dativo.supervisor import _publish
from dativo.supervisor._plugins import (
    Launch,
    PluginProcess,
    resolve,
    start_container,
    start_thread,
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
    reaped_containers: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "job": self.job,
            "status": self.status,
            "sandboxed": self.sandboxed,
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
            "plugins": self.plugins,
            "writer_metadata": self.writer_metadata,
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

    @property
    def name(self) -> str:
        return self.launch.name

    @property
    def channel(self) -> v1.Channel:
        assert self._channel is not None
        return self._channel

    def error(self, message: str, rule: str, hint: str | None = None) -> PluginError:
        return PluginError(
            message,
            plugin=self.name,
            role=self.launch.role,  # type: ignore[arg-type]
            rule=rule,
            hint=hint,
            logs=self.process.logs() or None,
        )

    def timeout_error(self) -> PluginError:
        limit = self.launch.spec.resources.timeout
        return self.error(
            f"ran longer than its wall-clock limit of {limit:g} s",
            "timeout",
            f"raise `{self.launch.field_path}.resources.timeout` if the work is legitimately long",
        )

    def log(self, message: v1.Log) -> None:
        now = time.monotonic()
        self._tokens = min(_LOG_BURST, self._tokens + (now - self._last) * _LOG_PER_SECOND)
        self._last = now
        if self._tokens < 1:
            self.dropped_logs += 1
            return
        self._tokens -= 1
        level = getattr(logging, message.level.upper(), logging.INFO)
        plugin_log.log(level, "[%s] %s", self.launch.role, message.message[:2000])

    def diagnose(self, what: str) -> PluginError:
        """Explain why the plugin stopped talking: OOM, a crash, a kill."""
        info: ExitInfo | None = self.process.wait(5.0)
        resources = self.launch.spec.resources
        field_path = self.launch.field_path
        if info is not None and info.oom_killed:
            return self.error(
                f"memory limit {format_size(resources.memory)} exceeded (OOM killed)",
                "memory",
                f"raise `{field_path}.resources.memory` (now {format_size(resources.memory)})",
            )
        if info is None:
            return self.error(f"{what}, and the plugin is still running", "protocol")
        if info.status == 137:
            return self.error(f"{what}: the plugin was killed (SIGKILL, exit 137)", "crash")
        return self.error(f"{what}: the plugin exited with status {info.status}", "crash")

    def from_error_message(self, message: v1.Error) -> PluginError:
        hint = f"fix `{self.launch.field_path}.config`" if message.category == "config" else None
        error = self.error(message.message, message.category, hint)
        error.transient = message.transient
        if message.detail:
            log.debug("%s plugin traceback:\n%s", self.launch.role, message.detail)
        return error


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
        self.channels: list[v1.Channel] = []
        self.end_sent = False
        self.failure: DativoError | None = None
        self.failed = threading.Event()

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
        target = job.target_dir
        if target is not None:
            target.mkdir(parents=True, exist_ok=True)
            self.report.recovered_runs = _publish.recover(
                target,
                job=job.name,
                is_alive=lambda rid: is_run_alive(base / rid),
                save_state=self._save_state,
            )
        rundir = RunDirectory(base, self.run_id)
        staging: Path | None = None
        try:
            if target is not None:
                user = job.target.writer.isolation.user
                staging = _publish.create_staging(target, self.run_id, user)
            reader = resolve(job, "reader", None)
            writer = resolve(job, "writer", staging)
            images: dict[str, str] = {}
            if engine is not None:
                for launch in (reader, writer):
                    assert launch.image is not None
                    info = engine.image(launch.image)
                    images[launch.role] = info.id
                    engine.verify_limits(
                        info.id,
                        user=launch.spec.isolation.user,
                        runtime=launch.spec.isolation.runtime,
                    )
            sessions = {}
            for launch in (reader, writer):
                directory, listener = rundir.listen(launch.role)
                if engine is not None:
                    process: PluginProcess = start_container(
                        engine,
                        launch,
                        image_id=images[launch.role],
                        run_id=self.run_id,
                        run_dir=rundir.path,
                        socket_dir=directory,
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
        except BaseException:
            for process in self.processes:
                process.stop()
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            for channel in self.channels:
                channel.close()
            for process in self.processes:
                process.stop()
                self.report.plugins[process.launch.role] = process.describe()
            rundir.close()

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
        try:
            hello = session.channel.recv_control(deadline=deadline)
        except TimeoutError:
            raise session.error(
                f"connected but sent no hello within {timeout:g} s", "handshake"
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
            config=dict(launch.spec.config),
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
        reader.channel._check = self._check(reader)
        writer.channel._check = self._check(writer)
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
        except _Cancelled:
            assert self.failure is not None
            raise self.failure from None
        except BaseException as exc:
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
        assert isinstance(result, v1.Result)
        self.report.writer_metadata = dict(result.metadata)
        if staging is not None and self.job.target_dir is not None:
            writer.process.stop()  # nothing may change the staging directory from now on
            files = _publish.validate_staged(
                staging, list(result.files), rows_sent=self.report.rows, plugin=writer.name
            )
            _publish.publish(
                self.job.target_dir,
                self.run_id,
                files,
                job=self.job.name,
                state=end.state,
                save_state=self._save_state,
            )
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
        schema: pa.Schema | None = None
        report = self.report
        progress = self.options.progress
        started = time.monotonic()
        check = reader.channel._check
        while True:
            # Between frames too: a plugin that never pauses must still meet its deadline,
            # and a writer failure must stop the relay at once.
            check()
            if time.monotonic() > writer.deadline:
                raise writer.timeout_error()
            try:
                kind, payload = reader.channel.recv_frame(deadline=reader.deadline, reuse=True)
            except v1.PeerClosed:
                raise reader.diagnose("closed the connection before `end`") from None
            except TimeoutError:
                raise reader.timeout_error() from None
            except ProtocolError as exc:
                raise reader.error(f"broke the protocol: {exc}", "protocol") from None
            if kind == v1.KIND_CONTROL:
                try:
                    message = v1.decode_control(payload)
                except ProtocolError as exc:
                    raise reader.error(f"broke the protocol: {exc}", "protocol") from None
                if isinstance(message, v1.Log):
                    reader.log(message)
                elif isinstance(message, v1.Checkpoint):
                    pass  # v1 commits the final state only, after the writer's files are published
                elif isinstance(message, v1.Error):
                    raise reader.from_error_message(message)
                elif isinstance(message, v1.End):
                    if schema is None:
                        raise reader.error("sent `end` before its schema", "protocol")
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
                self._forward(writer, payload)
                continue
            if info.header_type != 3:
                raise reader.error("sent a second schema in the same stream", "schema")
            try:
                batch = pa.ipc.read_record_batch(pa.ipc.read_message(buffer), schema)
                batch.validate(full=True)
            except (pa.ArrowException, ValueError) as exc:
                raise reader.error(
                    f"sent a record batch that does not match its declared schema: {exc}",
                    "schema",
                ) from None
            rows = batch.num_rows
            del batch, buffer  # release the reusable receive buffer before the next frame
            self._forward(writer, payload)
            report.rows += rows
            report.bytes += len(payload)
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
        except (pa.ArrowException, ValueError) as exc:
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


def _has_dictionary(arrow_type: pa.DataType) -> bool:
    if pa.types.is_dictionary(arrow_type):
        return True
    return any(_has_dictionary(arrow_type.field(i).type) for i in range(arrow_type.num_fields))


def describe_error(exc: DativoError) -> str:
    """The diagnosis the CLI prints, with the plugin's last log lines where useful."""
    text = str(exc)
    if isinstance(exc, PluginError) and exc.logs and exc.rule in ("crash", "memory", "handshake"):
        tail = "\n".join(exc.logs.strip().splitlines()[-15:])
        text += "\n  last log lines:\n    " + tail.replace("\n", "\n    ")
    return text
