"""Dativo: data ingestion with sandboxed, pluggable readers and writers speaking Arrow IPC."""

from dativo.errors import (
    ConfigError,
    DativoError,
    EngineError,
    InternalError,
    PluginError,
    ProtocolError,
    SignatureError,
    StateError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DativoError",
    "EngineError",
    "InternalError",
    "PluginError",
    "ProtocolError",
    "SignatureError",
    "StateError",
    "__version__",
]
