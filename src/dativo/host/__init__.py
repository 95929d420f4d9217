"""The plugin host: runs inside a plugin's container, loads the plugin class, speaks protocol v1.

It is also what the trusted in-process mode runs in a thread, so both modes share one code path.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import socket
import sys
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from dativo.errors import ProtocolError
from dativo.host._network import LoopbackRelay, destinations_from_env
from dativo.protocol import v1
from dativo.sdk import (
    DataReader,
    DataWriter,
    NetworkDestination,
    PluginConfigError,
    PluginContext,
    SourceError,
    WriteResult,
)

__all__ = ["load_plugin_class", "main", "serve"]

SOCKET_ENV = "DATIVO_SOCKET"
DEFAULT_SOCKET = "/run/dativo/plugin.sock"
PLUGIN_ENV = "DATIVO_PLUGIN"
PLUGIN_PATH_ENV = "DATIVO_PLUGIN_PATH"
INPUT_DIR_ENV = "DATIVO_INPUT_DIR"
OUTPUT_DIR_ENV = "DATIVO_OUTPUT_DIR"
ROLE_ENV = "DATIVO_ROLE"
_MAX_LOG_CHARS = 4000
_MAX_DETAIL_CHARS = 8000

PluginClass = type[DataReader] | type[DataWriter]


class _Stop(Exception):
    """The supervisor ended the session (abort or shutdown); unwind quietly."""


def load_plugin_class(implementation: str) -> PluginClass:
    """Import `module.path:ClassName` and check it is a DataReader or DataWriter subclass."""
    module_name, _, class_name = implementation.partition(":")
    if not module_name or not class_name:
        raise PluginConfigError(
            f"plugin implementation `{implementation}` must look like `module.path:ClassName`"
        )
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type) or not issubclass(cls, DataReader | DataWriter):
        raise PluginConfigError(
            f"`{implementation}` is not a subclass of dativo.sdk.DataReader or DataWriter"
        )
    return cls


class _LogForwarder(logging.Handler):
    """Sends log records to the supervisor as `log` messages."""

    def __init__(self, channel: v1.Channel) -> None:
        super().__init__(level=logging.INFO)
        self._channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        level = {logging.DEBUG: "debug", logging.WARNING: "warning"}.get(record.levelno)
        if level is None:
            level = "error" if record.levelno >= logging.ERROR else "info"
        try:
            text = self.format(record)[:_MAX_LOG_CHARS]
            self._channel.send(v1.Log(level=level, message=text))
        except Exception:
            self.handleError(record)


def _error_message(exc: BaseException) -> v1.Error:
    if isinstance(exc, PluginConfigError):
        return v1.Error(category="config", message=str(exc)[:_MAX_LOG_CHARS])
    if isinstance(exc, SourceError):
        return v1.Error(
            category="source", message=str(exc)[:_MAX_LOG_CHARS], transient=exc.transient
        )
    detail = "".join(traceback.format_exception(exc))[-_MAX_DETAIL_CHARS:]
    return v1.Error(
        category="plugin",
        message=f"{type(exc).__name__}: {exc}"[:_MAX_LOG_CHARS],
        detail=detail,
    )


def _recv_until_control(channel: v1.Channel) -> v1.ControlMessage:
    kind, payload = channel.recv_frame()
    if kind != v1.KIND_CONTROL:
        raise ProtocolError("expected a control frame from the supervisor")
    return v1.decode_control(payload)


def serve(
    channel: v1.Channel,
    cls: PluginClass,
    *,
    input_dir: Path | None = None,
    output_dir: Path | None = None,
    logger: logging.Logger | None = None,
    network: Mapping[str, NetworkDestination] | None = None,
) -> int:
    """Run one plugin session on a connected channel; return the process exit status."""
    role = "reader" if issubclass(cls, DataReader) else "writer"
    log = logger or logging.getLogger(f"dativo.plugin.{cls.name}")
    try:
        channel.send(
            v1.Hello(
                protocols=[v1.PROTOCOL_VERSION], role=role, plugin=cls.name, version=cls.version
            )
        )
        first = _recv_until_control(channel)
    except v1.PeerClosed:
        return 3
    except ProtocolError:
        return 2
    if isinstance(first, v1.Error):
        return 2
    if not isinstance(first, v1.Init) or first.protocol != v1.PROTOCOL_VERSION:
        channel.send(v1.Error(category="protocol", message="expected `init` for protocol 1"))
        return 2
    init = first

    def checkpoint(state: dict[str, Any]) -> None:
        channel.send(v1.Checkpoint(state=state))

    context = PluginContext(
        run_id=init.run_id,
        role=role,
        state=init.state,
        input_dir=input_dir,
        output_dir=output_dir,
        log=log,
        checkpoint=checkpoint,
        network=dict(network or {}),
    )
    plugin = cls()
    closed: list[bool] = []
    try:
        if isinstance(plugin, DataReader):
            _serve_reader(channel, plugin, init, context, closed)
        else:
            _serve_writer(channel, plugin, init, context, closed)
    except _Stop:
        return 0
    except v1.PeerClosed:
        return 3
    except Exception as exc:
        if not closed:
            if isinstance(plugin, DataWriter):
                _quietly(plugin.abort)
            _quietly(plugin.close)
        with contextlib.suppress(Exception):
            channel.send(_error_message(exc))
        return 1
    return 0


def _quietly(fn: Any) -> None:
    with contextlib.suppress(Exception):
        fn()


def _finish(channel: v1.Channel, plugin: DataReader | DataWriter, closed: list[bool]) -> None:
    """Wait for shutdown or abort, close the plugin and say bye."""
    message = _recv_until_control(channel)
    closed.append(True)  # from here on, a failure must not call abort/close again
    if isinstance(message, v1.Abort) and isinstance(plugin, DataWriter):
        plugin.abort()
    plugin.close()
    channel.send(v1.Bye())
    raise _Stop


class _BatchSender:
    """Writes each record batch's IPC message straight from Arrow memory into its frame.

    `RecordBatch.serialize()` would first copy the whole batch into one buffer; a stream writer
    over a file-like sink hands over the metadata and every body buffer in turn, and the
    frame's length is known beforehand (`get_record_batch_size`). The stream writer emits the
    schema message before its first batch; that happens here, once, on an empty batch, and is
    discarded (the schema frame was sent already).
    """

    closed = False  # the file-like protocol pyarrow checks

    def __init__(self, channel: v1.Channel, schema: pa.Schema) -> None:
        self._write: Any = None
        self._writer = pa.ipc.new_stream(pa.PythonFile(self, mode="w"), schema)
        self._writer.write_batch(pa.RecordBatch.from_pylist([], schema=schema))
        self._channel = channel

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        if self._write is not None:
            self._write(data)
        return size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def send(self, batch: pa.RecordBatch) -> None:
        with self._channel.arrow_frame(pa.ipc.get_record_batch_size(batch)) as write:
            self._write = write
            try:
                self._writer.write_batch(batch)
            finally:
                self._write = None


def _serve_reader(
    channel: v1.Channel,
    plugin: DataReader,
    init: v1.Init,
    context: PluginContext,
    closed: list[bool],
) -> None:
    plugin.initialize(dict(init.config), context)
    schema = plugin.get_schema()
    if not isinstance(schema, pa.Schema):
        raise TypeError(f"get_schema() returned {type(schema).__name__}, not pyarrow.Schema")
    channel.send_arrow(schema.serialize())
    batches = _BatchSender(channel, schema)
    for batch in plugin.read_batch(init.batch_size):
        if not isinstance(batch, pa.RecordBatch):
            raise TypeError(f"read_batch() yielded {type(batch).__name__}, not RecordBatch")
        if batch.num_rows == 0:
            continue
        if not batch.schema.equals(schema):
            raise TypeError(
                "read_batch() yielded a batch whose schema differs from get_schema(): "
                f"got {batch.schema}, declared {schema}"
            )
        batches.send(batch)
    channel.send(v1.End(state=plugin.get_incremental_state()))
    _finish(channel, plugin, closed)


def _serve_writer(
    channel: v1.Channel,
    plugin: DataWriter,
    init: v1.Init,
    context: PluginContext,
    closed: list[bool],
) -> None:
    plugin.initialize(dict(init.config), context)
    channel.send(v1.Ready())
    schema: pa.Schema | None = None
    while True:
        kind, payload = channel.recv_frame()
        if kind == v1.KIND_ARROW:
            buffer = pa.py_buffer(payload)
            if schema is None:
                schema = pa.ipc.read_schema(buffer)
                plugin.open(schema)
                continue
            message = pa.ipc.read_message(buffer)
            plugin.write_batch(pa.ipc.read_record_batch(message, schema))
            continue
        control = v1.decode_control(payload)
        if isinstance(control, v1.End):
            if schema is None:
                raise ProtocolError("`end` before the schema")
            result = plugin.finalize()
            if not isinstance(result, WriteResult):
                raise TypeError(f"finalize() returned {type(result).__name__}, not WriteResult")
            channel.send(v1.Result(**result.to_json()))
            _finish(channel, plugin, closed)
        if isinstance(control, v1.Abort):
            closed.append(True)
            plugin.abort()
            plugin.close()
            raise _Stop
        raise ProtocolError(f"unexpected `{control.type}` from the supervisor")


def _connect(path: str, timeout: float = 30.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    """Entry point of plugin images: `python -m dativo.host [module:Class]`."""
    args = sys.argv[1:] if argv is None else argv
    implementation = args[0] if args else os.environ.get(PLUGIN_ENV, "")
    for extra in filter(None, os.environ.get(PLUGIN_PATH_ENV, "").split(os.pathsep)):
        sys.path.insert(0, extra)
    sock = _connect(os.environ.get(SOCKET_ENV, DEFAULT_SOCKET))
    channel = v1.Channel(sock, max_frame_bytes=1 << 31, poll=3600.0)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cls = load_plugin_class(implementation)
    except Exception as exc:
        role = "writer" if os.environ.get(ROLE_ENV) == "writer" else "reader"
        channel.send(v1.Hello(protocols=[1], role=role, plugin=implementation[:200], version="?"))
        channel.send(v1.Error(category="plugin", message=f"cannot load `{implementation}`: {exc}"))
        return 2
    logger = logging.getLogger(f"dativo.plugin.{cls.name}")
    logger.addHandler(_LogForwarder(channel))
    logger.propagate = False
    input_dir = os.environ.get(INPUT_DIR_ENV)
    output_dir = os.environ.get(OUTPUT_DIR_ENV)
    network = destinations_from_env(os.environ)
    relay = LoopbackRelay(network, logger) if network else None
    status = serve(
        channel,
        cls,
        input_dir=Path(input_dir) if input_dir else None,
        output_dir=Path(output_dir) if output_dir else None,
        logger=logger,
        network=network,
    )
    if relay is not None:
        relay.close()
    channel.close()
    return status
