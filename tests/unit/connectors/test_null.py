"""The `null` writer, and the registry of built-in plugins."""

from __future__ import annotations

import importlib

import pytest

from dativo.connectors import BUILTINS, builtin_implementation
from dativo.connectors.generate import generate_table
from dativo.connectors.null import NullWriter
from dativo.errors import ConfigError
from dativo.sdk import DataReader, DataWriter, PluginConfigError, PluginContext

CTX = PluginContext(run_id="run-1", role="writer")


def test_counts_rows_and_bytes() -> None:
    writer = NullWriter()
    writer.initialize({}, CTX)
    table = generate_table(2500, 5)
    batches = table.to_batches(max_chunksize=1000)
    for batch in batches:
        writer.write_batch(batch)
    result = writer.finalize()
    assert result.files == []
    assert result.metadata == {"rows": 2500, "bytes": sum(b.nbytes for b in batches)}


def test_takes_no_config() -> None:
    with pytest.raises(PluginConfigError, match="unknown key `path`"):
        NullWriter().initialize({"path": "x"}, CTX)


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_registry_points_at_plugin_classes(name: str) -> None:
    role, target = BUILTINS[name]
    assert builtin_implementation(name) == target
    module, _, cls_name = target.partition(":")
    cls = getattr(importlib.import_module(module), cls_name)
    assert issubclass(cls, DataReader if role == "reader" else DataWriter)
    assert cls.name == name
    assert cls.version


def test_unknown_builtin() -> None:
    with pytest.raises(ConfigError, match=r"`s3` is not a built-in.*`files` \(reader\)"):
        builtin_implementation("s3")
