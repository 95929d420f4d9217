"""The built-in readers and writers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from dativo.errors import ConfigError
from dativo.sdk import PluginConfigError

__all__ = ["BUILTINS", "builtin_implementation", "parse_plugin_config"]

#: Built-in plugin name -> (role, "module:Class").
BUILTINS: dict[str, tuple[str, str]] = {
    "files": ("reader", "dativo.connectors.files:FileReader"),
    "generate": ("reader", "dativo.connectors.generate:GenerateReader"),
    "postgres": ("reader", "dativo.connectors.postgres:PostgresReader"),
    "http": ("reader", "dativo.connectors.http:HttpReader"),
    "parquet": ("writer", "dativo.connectors.parquet:ParquetWriter"),
    "null": ("writer", "dativo.connectors.null:NullWriter"),
}


def builtin_implementation(name: str) -> str:
    """Return the `module:Class` implementing the built-in plugin `name`.

    Raises:
        ConfigError: `name` is not a built-in; the message lists the built-ins.
    """
    try:
        return BUILTINS[name][1]
    except KeyError:
        known = ", ".join(f"`{n}` ({role})" for n, (role, _) in sorted(BUILTINS.items()))
        raise ConfigError(
            f"`{name}` is not a built-in plugin; the built-ins are {known}. "
            "Use one of these names, or give an image for a third-party plugin."
        ) from None


M = TypeVar("M", bound=BaseModel)

_MAX_REPR = 80


def parse_plugin_config(model: type[M], config: object, plugin: str) -> M:
    """Validate a plugin's `config` mapping with a pydantic model (use `extra="forbid"`).

    Args:
        model: the pydantic model of the config.
        config: the `config` mapping of the job file, as given (None means empty).
        plugin: how to name the plugin in messages, for example "reader `files`".

    Raises:
        PluginConfigError: one readable message listing every problem, what was received,
            the valid keys and how to fix it.
    """
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise PluginConfigError(
            f"{plugin}: `config` must be a mapping of keys to values, got "
            f"{type(config).__name__} {_short(config)}. Write it as `config: {{key: value}}`."
        )
    try:
        return model.model_validate(dict(config))
    except ValidationError as exc:
        raise PluginConfigError(_describe(exc, model, plugin)) from None


def _describe(exc: ValidationError, model: type[BaseModel], plugin: str) -> str:
    lines: list[str] = []
    for err in exc.errors(include_url=False):
        loc = [p for p in err["loc"] if not isinstance(p, str) or not p.startswith("function-")]
        where = _loc_text(loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            valid = _keys(parent) if parent is not None else []
            hint = f"; valid keys here: {', '.join(valid)}" if valid else ""
            lines.append(f"unknown key `{where}`{hint}")
        elif kind == "missing":
            lines.append(f"`{where}` is required")
        else:
            msg = str(err["msg"])
            for prefix in ("Value error, ", "Assertion failed, "):
                msg = msg.removeprefix(prefix)
            got = "" if err.get("input") is None else f" (got {_short(err.get('input'))})"
            lines.append(f"`{where}`: {msg}{got}" if where else f"{msg}{got}")
    body = "\n".join(f"  - {line}" for line in lines)
    return (
        f"{plugin}: invalid config:\n{body}\n"
        f"  fix: edit the plugin's `config` in the job file; valid keys: {', '.join(_keys(model))}"
    )


def _loc_text(loc: list[int | str]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


def _keys(model: type[BaseModel]) -> list[str]:
    return [field.alias or name for name, field in model.model_fields.items()]


def _model_at(model: type[BaseModel], loc: list[int | str]) -> type[BaseModel] | None:
    current: type[BaseModel] = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = next(
            (f for n, f in current.model_fields.items() if (f.alias or n) == part),
            None,
        )
        ann: Any = field.annotation if field is not None else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        current = ann
    return current


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."
