"""The plugin SDK: the two base classes a reader or writer implements, and what they receive.

A plugin knows nothing of Docker or of the supervisor. The plugin host (`dativo.host`) loads a
subclass of :class:`DataReader` or :class:`DataWriter`, calls it in the order documented below
and speaks protocol v1 on its behalf.

Reader lifecycle::

    initialize(config, context) -> get_schema() -> read_batch(batch_size)... ->
    get_incremental_state() -> close()

Writer lifecycle::

    initialize(config, context) -> write_batch(batch)... -> finalize() -> close()
    # or, when the run fails anywhere: abort() -> close()
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

__all__ = [
    "DataReader",
    "DataWriter",
    "NetworkDestination",
    "OutputFile",
    "PluginConfigError",
    "PluginContext",
    "SourceError",
    "WriteResult",
]


class PluginConfigError(Exception):
    """Raise from `initialize` when the plugin's `config` is wrong; the message reaches the user.

    Say what was received, what is valid and how to fix it. Never include secret values.
    """


class SourceError(Exception):
    """Raise when the source or destination fails (file unreadable, server down).

    Args:
        message: what failed, in plain words.
        transient: True when retrying later may succeed.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class NetworkDestination:
    """A network destination the job granted the plugin, and how to reach it.

    Inside a container the plugin has no network: the supervisor forwards each granted
    destination (docs/network-policy.md). Either connect to `socket_path` (Unix socket; for libpq:
    `host=socket_dir port=port`), or connect a TCP client to `host`:`port`, a loopback relay the
    plugin host runs to that socket. A granted host *name* also resolves to that relay inside
    the container, so `connect("db.example.com", 5432)` works as is.

    Attributes:
        destination: the grant, `host:port` as the job wrote it (normalised).
        host: where a TCP client connects: the relay's loopback address in a container, the
            granted host itself in the unsandboxed in-process mode.
        port: the granted port (the relay listens on the same port).
        socket_path: the Unix socket the supervisor forwards; None in the in-process mode.
    """

    destination: str
    host: str
    port: int
    socket_path: str | None = None

    @property
    def socket_dir(self) -> str | None:
        """The directory of `socket_path`: libpq's `host` for a Unix-socket connection."""
        return None if self.socket_path is None else self.socket_path.rsplit("/", 1)[0]


@dataclass(frozen=True)
class PluginContext:
    """What the host hands a plugin besides its config.

    Attributes:
        run_id: identifier of this run, unique per run; use it in output file names.
        role: `reader` or `writer`.
        state: for readers, the incremental state saved by the last successful run (or None).
        input_dir: a read-only directory of input files, when the job grants one.
        output_dir: a writable staging directory, when the job grants one. Files left here are
            published by the supervisor only if the run succeeds.
        log: a logger whose records are forwarded to the supervisor (rate-limited).
        checkpoint: call with a JSON-serialisable state to record a cursor that is valid once
            every batch yielded so far has been written. Readers only.
        network: the destinations the job grants, by `host:port`; empty when none.
    """

    run_id: str
    role: str
    state: dict[str, Any] | None = None
    input_dir: Path | None = None
    output_dir: Path | None = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("dativo.plugin"))
    checkpoint: Callable[[dict[str, Any]], None] = field(default=lambda _state: None)
    network: Mapping[str, NetworkDestination] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputFile:
    """One file a writer produced, relative to its staging directory.

    Attributes:
        path: POSIX path relative to `context.output_dir` (no `..`, no leading `/`).
        rows: rows in the file.
        bytes: size in bytes.
        partition: partition values of the file, if the writer partitions.
    """

    path: str
    rows: int
    bytes: int
    partition: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "rows": self.rows,
            "bytes": self.bytes,
            "partition": dict(self.partition),
        }


@dataclass(frozen=True)
class WriteResult:
    """What `DataWriter.finalize` returns: the files staged and any metadata to report.

    Attributes:
        files: every file left in the staging directory for the supervisor to publish.
        metadata: JSON-serialisable extra facts (commit info, encryption audit records).
    """

    files: list[OutputFile] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {"files": [f.to_json() for f in self.files], "metadata": dict(self.metadata)}


class DataReader(ABC):
    """Base class of every reader plugin.

    Subclasses set `name` and `version`, and implement the abstract methods.
    """

    name: str = "reader"
    version: str = "0.0.0"

    @abstractmethod
    def initialize(self, config: dict[str, Any], context: PluginContext) -> None:
        """Validate `config` and open the source.

        Args:
            config: the `config` mapping of the job file, as given.
            context: run id, prior incremental state, mounted directories, logger.

        Raises:
            PluginConfigError: the config is wrong.
            SourceError: the source cannot be opened.
        """

    @abstractmethod
    def get_schema(self) -> pa.Schema:
        """Return the schema every batch will have. Batches that differ fail the run.

        Returns:
            The Arrow schema of the stream (no dictionary-encoded fields in protocol v1).
        """

    @abstractmethod
    def read_batch(self, batch_size: int) -> Iterator[pa.RecordBatch]:
        """Yield the data as record batches of at most about `batch_size` rows.

        Args:
            batch_size: the preferred number of rows per batch.

        Returns:
            An iterator of batches matching `get_schema()`.

        Raises:
            SourceError: reading failed.
        """

    def get_incremental_state(self) -> dict[str, Any] | None:
        """Return the cursor to save once this run's data is durably written, or None."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources. Called once, also after a failure."""


class DataWriter(ABC):
    """Base class of every writer plugin."""

    name: str = "writer"
    version: str = "0.0.0"

    @abstractmethod
    def initialize(self, config: dict[str, Any], context: PluginContext) -> None:
        """Validate `config` and prepare to write.

        Args:
            config: the `config` mapping of the job file, as given.
            context: run id, staging directory, logger.

        Raises:
            PluginConfigError: the config is wrong.
            SourceError: the destination cannot be prepared.
        """

    def open(self, schema: pa.Schema) -> None:  # noqa: B027 - optional hook
        """Called once with the stream's schema before the first `write_batch`."""

    @abstractmethod
    def write_batch(self, batch: pa.RecordBatch) -> None:
        """Write one batch. It has been validated against the reader's declared schema.

        Raises:
            SourceError: writing failed.
        """

    @abstractmethod
    def finalize(self) -> WriteResult:
        """Flush and close every output; return what was staged.

        Returns:
            The files staged and metadata. Nothing is visible to users until the supervisor
            publishes these files after the run succeeds.
        """

    def abort(self) -> None:  # noqa: B027 - optional hook
        """Discard partial output; the run failed. Called instead of `finalize`."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources. Called once, also after a failure."""
