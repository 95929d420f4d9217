"""The manifests of the built-in plugins, as `sandbox/build_images.py` labels their images."""

from __future__ import annotations

import importlib
from typing import Any

from dativo.connectors import BUILTINS
from dativo.signing._manifest import canonical_json, parse_manifest

__all__ = ["BUILTIN_ENTRYPOINT", "builtin_manifest", "builtin_manifest_label"]

BUILTIN_ENTRYPOINT = ("python3", "-m", "dativo.host")

_DESCRIPTIONS = {
    "files": "Reads CSV, JSON lines and Parquet files from the input directory (`source.files`).",
    "generate": "Generates deterministic synthetic rows; reads nothing.",
    "postgres": (
        "Reads a PostgreSQL table or query (binary COPY into Arrow through ADBC's libpq "
        "driver); reaches only the destinations the job grants."
    ),
    "http": "Reads JSON HTTP APIs page by page; the job grants the hosts (`network`).",
    "parquet": "Writes Parquet files into its staging directory for the supervisor to publish.",
    "null": "Discards every row.",
}
_CONFIG_MODELS = {
    "files": "dativo.connectors.files:FileReaderConfig",
    "generate": "dativo.connectors.generate:GenerateConfig",
    "postgres": "dativo.connectors.postgres:PostgresConfig",
    "http": "dativo.connectors.http:HttpReaderConfig",
    "parquet": "dativo.connectors.parquet:ParquetWriterConfig",
    "null": "dativo.connectors.null:NullWriterConfig",
}
# The job file's own defaults, and its own upper bounds as the maxima: the built-ins handle
# data of any size, and the job file is where an operator narrows them.
# Network connectors may reach whatever the job grants (the grant is the control; the job file
# is the operator's); the others need no network at all.
_NETWORK = {"postgres": ["*:*"], "http": ["*:*"]}
_SECRETS = {"postgres": ["password"]}
_DEFAULT = {"cpus": 1.0, "memory": "1GiB", "pids": 128, "timeout": "1h"}
_MAX = {"cpus": 64.0, "memory": "64GiB", "pids": 4096, "timeout": "7d"}


def builtin_manifest(name: str, version: str) -> dict[str, Any]:
    """The manifest of the built-in plugin `name` at Dativo `version`, validated."""
    role, implementation = BUILTINS[name]
    module, _, attribute = _CONFIG_MODELS[name].partition(":")
    config_model = getattr(importlib.import_module(module), attribute)
    manifest = {
        "manifest_version": 1,
        "name": f"dativo/{name}",
        "version": version,
        "kind": role,
        "protocol": 1,
        "entrypoint": [*BUILTIN_ENTRYPOINT, implementation],
        "description": _DESCRIPTIONS[name],
        "network": list(_NETWORK.get(name, [])),
        "resources": {"default": dict(_DEFAULT), "max": dict(_MAX)},
        "config_schema": config_model.model_json_schema(),
        "secrets": list(_SECRETS.get(name, [])),
    }
    parse_manifest(manifest)
    return manifest


def builtin_manifest_label(name: str, version: str) -> str:
    """The `org.dativo.manifest` label value of a built-in image (canonical JSON)."""
    return canonical_json(builtin_manifest(name, version)).decode()
