"""Reading job files and turning every problem in them into one readable `ConfigError`."""

from __future__ import annotations

import datetime as dt
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from dativo.config._models import JobConfig, Problem
from dativo.config._units import MiB, format_size
from dativo.errors import ConfigError

__all__ = [
    "ConfigProblem",
    "JobConfigError",
    "job_json_schema",
    "load_job",
    "parse_job",
]

#: Job files larger than this are refused before parsing.
MAX_JOB_FILE_BYTES = 1 * MiB
_MAX_SHOWN = 60
_SECRET_WORDS = (
    "password",
    "passwd",
    "secret",
    "token",
    "credential",
    "private_key",
    "privatekey",
    "api_key",
    "apikey",
    "access_key",
    "accesskey",
)

# Extra words for "missing; required" at well-known places.
_MISSING_HINTS: dict[str, str] = {
    "version": "write `version: 1`",
    "name": "such as `name: orders-daily`",
    "source": "a mapping with at least `reader`",
    "target": "a mapping with at least `writer`",
    "source.reader": "such as `reader: {type: builtin, name: files}`",
    "target.writer": "such as `writer: {type: builtin, name: parquet}`",
}


@dataclass(frozen=True)
class ConfigProblem:
    """One problem found in a job file.

    Attributes:
        field: dotted path of the field (`source.reader.resources.memory`, `[0]` for list
            items), or "" for the file as a whole.
        message: what was found and what is allowed.
    """

    field: str
    message: str

    def __str__(self) -> str:
        return f"`{self.field}`: {self.message}" if self.field else self.message


class JobConfigError(ConfigError):
    """A job file is wrong; `problems` lists every problem found, in file order."""

    def __init__(self, source: str, problems: Sequence[ConfigProblem]) -> None:
        self.problems: tuple[ConfigProblem, ...] = tuple(problems)
        count = len(self.problems)
        if count == 1 and not self.problems[0].field:
            message = f"{source}: {self.problems[0].message}"
        else:
            noun = "problem" if count == 1 else "problems"
            lines = [f"{source}: {count} {noun}"]
            lines += [f"  - {problem}" for problem in self.problems]
            message = "\n".join(lines)
        super().__init__(message, source=source, field=self.problems[0].field or None)


# --------------------------------------------------------------------------------------------
# Loading


def load_job(path: str | os.PathLike[str]) -> JobConfig:
    """Read, parse and validate a job file.

    Relative paths inside it are resolved against the file's directory.

    Raises:
        ConfigError: anything is wrong (a `JobConfigError` listing every problem found); the
            message names the file as given.
    """
    shown = os.fspath(path)

    def fail(message: str) -> JobConfigError:
        return JobConfigError(shown, [ConfigProblem("", message)])

    file = Path(shown)
    try:
        if file.is_dir():
            raise fail("is a directory; expected a job file such as `job.yaml`")
        with file.open("rb") as handle:
            raw = handle.read(MAX_JOB_FILE_BYTES + 1)
    except FileNotFoundError:
        raise fail("file not found") from None
    except PermissionError:
        raise fail("permission denied; cannot read the job file") from None
    except OSError as exc:
        raise fail(f"cannot read the job file: {exc.strerror or exc}") from None
    if len(raw) > MAX_JOB_FILE_BYTES:
        raise fail(f"larger than {format_size(MAX_JOB_FILE_BYTES)}; this is not a job file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise fail(f"not UTF-8 text (bad byte at offset {exc.start})") from None
    data, lines = _parse_yaml(text, fail)
    absolute = Path(os.path.abspath(file))
    return _build(data, shown, absolute.parent, absolute, lines)


def parse_job(
    data: Mapping[str, Any], *, source: str = "<job>", base_dir: Path | None = None
) -> JobConfig:
    """Validate an already-parsed job mapping.

    Args:
        data: the job as a mapping, as YAML would give it.
        source: how to name the job in error messages.
        base_dir: directory relative paths are resolved against; the current directory if None.

    Raises:
        ConfigError: anything is wrong (a `JobConfigError` listing every problem found).
    """
    base = Path(os.path.abspath(base_dir if base_dir is not None else Path.cwd()))
    return _build(data, source, base, None, {})


def job_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a job file."""
    schema = JobConfig.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key given twice in one mapping."""

    def construct_mapping(
        self, node: yaml.MappingNode, deep: bool = False
    ) -> dict[typing.Hashable, Any]:
        seen: dict[object, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(
                key_node, yaml.ScalarNode
            ):
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                first = seen[key].start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"the key `{_truncate(str(key))}` is given twice (first on line {first})",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


# Line (0-based) of each mapping key and list item, by path; every path part as a string.
_Lines = dict[tuple[str, ...], int]


def _parse_yaml(text: str, fail: typing.Callable[[str], JobConfigError]) -> tuple[object, _Lines]:
    """Parse YAML; also return the line of every mapping key and list item, by path."""
    loader: _UniqueKeyLoader | None = None
    try:
        loader = _UniqueKeyLoader(text)  # checks for unprintable characters
        node = loader.get_single_node()
        data = None if node is None else loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        # Built by hand: PyYAML's own text quotes the offending line, which may hold a secret.
        kind = (
            "invalid YAML"
            if isinstance(exc, yaml.constructor.ConstructorError)
            else "YAML syntax error"
        )
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "not valid YAML"
        detail = ""
        if exc.context and exc.problem and exc.context_mark is not None:
            detail = f" ({exc.context} at line {exc.context_mark.line + 1})"
        raise fail(f"{kind}{where}: {problem}{detail}") from None
    except yaml.reader.ReaderError as exc:
        raise fail(f"not valid YAML: {exc.reason} (character {exc.position + 1})") from None
    except yaml.YAMLError as exc:
        raise fail("not valid YAML: " + " ".join(str(exc).split())) from None
    finally:
        if loader is not None:
            loader.dispose()
    lines: _Lines = {}
    if node is not None:
        _collect_lines(node, (), lines, set())
    return data, lines


def _collect_lines(node: yaml.Node, path: tuple[str, ...], lines: _Lines, active: set[int]) -> None:
    if id(node) in active:  # a recursive alias
        return
    active.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                child = (*path, key_node.value)
                lines.setdefault(child, key_node.start_mark.line)
                _collect_lines(value_node, child, lines, active)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*path, str(index))
            lines.setdefault(child, item.start_mark.line)
            _collect_lines(item, child, lines, active)
    active.discard(id(node))


def _build(
    data: object, source: str, base_dir: Path, job_path: Path | None, lines: _Lines
) -> JobConfig:
    if data is None:
        raise JobConfigError(
            source, [ConfigProblem("", "the file is empty; a job file starts with `version: 1`")]
        )
    if not isinstance(data, Mapping):
        raise JobConfigError(
            source,
            [
                ConfigProblem(
                    "",
                    f"the top level is {_describe(data, secret=False)}; expected a mapping with "
                    f"keys {_keys(JobConfig)}",
                )
            ],
        )
    version = data.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version != 1:
        # The rest of a file of another version cannot be judged by version 1 rules.
        raise JobConfigError(
            source,
            [
                ConfigProblem(
                    "version",
                    f"got `{version}`; this Dativo reads job file version `1` only "
                    "(write `version: 1`)",
                )
            ],
        )
    try:
        job = JobConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise JobConfigError(source, _problems(exc, lines)) from None
    job._base_dir = base_dir
    job._job_path = job_path
    return job


# --------------------------------------------------------------------------------------------
# Turning pydantic errors into problems


def _problems(exc: ValidationError, lines: _Lines) -> list[ConfigProblem]:
    """Translate every error, in the order their places appear in the file."""
    found: list[tuple[int, int, ConfigProblem]] = []
    for index, error in enumerate(exc.errors(include_url=False)):
        problem = _translate(error)
        if any(problem == other for _, _, other in found):
            continue
        parts = tuple(str(part) for part in _locate(tuple(error["loc"])).parts)
        line = -1
        for end in range(len(parts), 0, -1):  # the deepest place the file has
            if parts[:end] in lines:
                line = lines[parts[:end]]
                break
        found.append((line, index, problem))
    return [problem for _, _, problem in sorted(found, key=lambda item: item[:2])]


@dataclass
class _Place:
    """Where a pydantic `loc` points in the job model, with union tags dropped."""

    parts: list[int | str]
    model: type[BaseModel] | None  # the model found at the end, if any
    parent: type[BaseModel] | None  # the model holding the last part, if any
    annotation: Any  # the annotation of the last part, if known
    union: dict[str, type[BaseModel]] | None  # tag -> model when the last part is a union


def _union_members(annotation: Any) -> dict[str, type[BaseModel]] | None:
    if get_origin(annotation) not in (typing.Union, types.UnionType):
        return None
    members: dict[str, type[BaseModel]] = {}
    for arg in get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel) and "type" in arg.model_fields:
            for tag in get_args(arg.model_fields["type"].annotation):
                members[str(tag)] = arg
    return members or None


def _locate(loc: tuple[int | str, ...]) -> _Place:
    model: type[BaseModel] | None = JobConfig
    parent: type[BaseModel] | None = None
    annotation: Any = JobConfig
    union: dict[str, type[BaseModel]] | None = None
    parts: list[int | str] = []
    for item in loc:
        if union is not None and isinstance(item, str) and item in union:
            model, union = union[item], None
            annotation = model
            continue
        union = None
        parts.append(item)
        parent = model
        if model is not None and isinstance(item, str) and item in model.model_fields:
            annotation = model.model_fields[item].annotation
            union = _union_members(annotation)
            model = (
                annotation
                if isinstance(annotation, type) and issubclass(annotation, BaseModel)
                else None
            )
        else:
            model, annotation = None, None
    return _Place(parts, model, parent, annotation, union)


def _format_path(parts: Sequence[int | str]) -> str:
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]+", part):
            text += f".{part}" if text else part
        else:
            text += f"[{_truncate(repr(part))}]"
    return text


def _is_secret(key: object) -> bool:
    if not isinstance(key, str):
        return False
    folded = key.lower().replace("-", "_")
    return any(word in folded for word in _SECRET_WORDS)


def _truncate(text: str) -> str:
    text = text.replace("\n", "\\n").replace("\r", "\\r").replace("`", "'")
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 1] + "\u2026"


def _describe(value: object, *, secret: bool) -> str:
    """Say what was found, without echoing secrets or whole mappings."""
    if value is None:
        return "an empty value (`null`)"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if secret:
        return "`***`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}` (a boolean)"
    if isinstance(value, int | float | str | dt.date):
        if isinstance(value, str) and not value:
            return "an empty string"
        return f"`{_truncate(str(value))}`"
    return f"a value of type `{type(value).__name__}`"


def _keys(model: type[BaseModel]) -> str:
    return ", ".join(f"`{name}`" for name in sorted(model.model_fields))


def _literal_values(annotation: Any) -> list[str] | None:
    if get_origin(annotation) is Literal:
        return [str(value) for value in get_args(annotation)]
    for arg in get_args(annotation):  # Optional[Literal[...]]
        if get_origin(arg) is Literal:
            return [str(value) for value in get_args(arg)]
    return None


def _one_of(values: Sequence[str]) -> str:
    return ", ".join(f"`{value}`" for value in values)


def _translate(error: ErrorDetails) -> ConfigProblem:
    kind = error["type"]
    place = _locate(tuple(error["loc"]))
    parts = place.parts
    path = _format_path(parts)
    value = error.get("input")
    ctx = error.get("ctx") or {}
    secret = any(_is_secret(part) for part in parts)
    found = f"got {_describe(value, secret=secret)}"

    if kind == "missing":
        hint = _MISSING_HINTS.get(path)
        if hint is None and place.union is not None:
            hint = f"a mapping with `type`: {_one_of(list(place.union))}"
        return ConfigProblem(path, "missing; required" + (f", {hint}" if hint else ""))

    if kind == "extra_forbidden":
        key = parts[-1] if parts else ""
        allowed = sorted(place.parent.model_fields) if place.parent is not None else []
        message = "unknown key"
        close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        if close:
            message += f" (did you mean `{close[0]}`?)"
        if allowed:
            message += f"; allowed keys here: {_one_of(allowed)}"
        if not close and "config" in allowed:
            message += " (the plugin's own settings go under `config`)"
        return ConfigProblem(path, message)

    if kind == "invalid_key":
        names = _keys(place.parent) if place.parent else "`name`"
        where = "" if len(parts) > 1 else " at the top level"
        return ConfigProblem(
            _format_path(parts[:-1]),
            f"the key `{_truncate(str(value))}`{where} is not a string; keys here are names "
            f"such as {names}",
        )

    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = list(place.union or {}) or re.findall(r"'([^']*)'", ctx.get("expected_tags", ""))
        type_path = _format_path([*parts, "type"])
        if kind == "union_tag_not_found":
            return ConfigProblem(type_path, f"missing; required, one of {_one_of(tags)}")
        tag = value.get("type") if isinstance(value, Mapping) else ctx.get("tag")
        return ConfigProblem(
            type_path, f"got {_describe(tag, secret=False)}; expected one of {_one_of(tags)}"
        )

    if kind in ("model_type", "model_attributes_type", "dict_type"):
        if place.union is not None:
            example = {
                "source.reader": " such as `{type: builtin, name: files}`",
                "target.writer": " such as `{type: builtin, name: parquet}`",
            }.get(path, "")
            return ConfigProblem(
                path,
                f"{found}; expected a mapping with `type` ({_one_of(list(place.union))}) and "
                f"its settings{example}",
            )
        if place.model is not None:
            return ConfigProblem(
                path, f"{found}; expected a mapping with keys {_keys(place.model)}"
            )
        what = (
            "a mapping of plugin settings, such as `{table: orders}`"
            if (parts and parts[-1] == "config")
            else "a mapping"
        )
        return ConfigProblem(path, f"{found}; expected {what}")

    if kind == "value_error":
        cause = ctx.get("error")
        text = str(cause) if cause is not None else error["msg"].removeprefix("Value error, ")
        if isinstance(cause, Problem) and not cause.show_input:
            return ConfigProblem(path, text)
        return ConfigProblem(path, f"{found}; {text}")

    if kind == "literal_error":
        values = _literal_values(place.annotation) or re.findall(
            r"'([^']*)'", ctx.get("expected", "")
        )
        return ConfigProblem(path, f"{found}; expected one of {_one_of(values)}")

    if kind in ("string_type", "string_unicode"):
        return ConfigProblem(path, f"{found}; expected a string")

    if kind in ("path_type", "path_parsing"):
        return ConfigProblem(path, f"{found}; expected a path such as `./data`")

    message = error["msg"]
    return ConfigProblem(path, f"{found}; {message[:1].lower()}{message[1:]}")
