"""The job file: its models (version 1), loading and validation, and size/duration units."""

from __future__ import annotations

from dativo.config._load import (
    ConfigProblem,
    JobConfigError,
    job_json_schema,
    load_job,
    parse_job,
)
from dativo.config._models import (
    READER_BUILTINS,
    WRITER_BUILTINS,
    BuiltinPlugin,
    BuiltinReader,
    BuiltinWriter,
    ImagePlugin,
    Isolation,
    JobConfig,
    PluginSpec,
    PythonPlugin,
    ReaderSpec,
    Resources,
    RunSpec,
    SourceSpec,
    StateSpec,
    TargetSpec,
    WriterSpec,
    parse_destination,
)
from dativo.config._units import format_duration, format_size, parse_duration, parse_size

__all__ = [
    "READER_BUILTINS",
    "WRITER_BUILTINS",
    "BuiltinPlugin",
    "BuiltinReader",
    "BuiltinWriter",
    "ConfigProblem",
    "ImagePlugin",
    "Isolation",
    "JobConfig",
    "JobConfigError",
    "PluginSpec",
    "PythonPlugin",
    "ReaderSpec",
    "Resources",
    "RunSpec",
    "SourceSpec",
    "StateSpec",
    "TargetSpec",
    "WriterSpec",
    "format_duration",
    "format_size",
    "job_json_schema",
    "load_job",
    "parse_destination",
    "parse_duration",
    "parse_job",
    "parse_size",
]
