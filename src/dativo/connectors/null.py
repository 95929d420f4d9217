"""The `null` writer: counts rows and bytes and discards them (for benchmarks)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from dativo.connectors import parse_plugin_config
from dativo.sdk import DataWriter, PluginContext, WriteResult

__all__ = ["NullWriter"]


class NullWriterConfig(BaseModel):
    """The `null` writer takes no config."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NullWriter(DataWriter):
    """Discards every batch; `finalize` reports `{"rows": n, "bytes": n}` and no files."""

    name = "null"
    version = "0.1.0"

    def __init__(self) -> None:
        self.rows = 0
        self.bytes = 0

    def initialize(self, config: dict[str, Any], context: PluginContext) -> None:
        parse_plugin_config(NullWriterConfig, config, "writer `null`")

    def write_batch(self, batch: pa.RecordBatch) -> None:
        self.rows += batch.num_rows
        self.bytes += batch.nbytes

    def finalize(self) -> WriteResult:
        return WriteResult(files=[], metadata={"rows": self.rows, "bytes": self.bytes})
