"""The plugin manifest, canonical JSON, strict JSON parsing and semantic versions."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from dativo.config import parse_destination, parse_duration, parse_size

__all__ = [
    "LABEL_MANIFEST",
    "Manifest",
    "ManifestError",
    "ManifestResources",
    "ResourceLimits",
    "Version",
    "canonical_json",
    "describe_validation_error",
    "loads_strict",
    "manifest_digest",
    "parse_manifest",
]

#: The image label holding the manifest; labels are part of the image config, so the image ID
#: (the config's digest) covers it.
LABEL_MANIFEST = "org.dativo.manifest"

_NAME_PART = r"[a-z0-9][a-z0-9._-]{0,62}"
NAME_PATTERN = rf"^{_NAME_PART}/{_NAME_PART}$"
_NAME_RE = re.compile(NAME_PATTERN)
_SECRET_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,127}")
# semver.org's regular expression (2.0.0), anchored.
_SEMVER_RE = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?"
)
MAX_MANIFEST_BYTES = 256 * 1024


class ManifestError(ValueError):
    """A manifest (or other signed JSON) is malformed; the message says where."""


def canonical_json(value: object) -> bytes:
    """The one byte string a JSON value signs as: sorted keys, no spaces, UTF-8."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """`sha256:<hex>` of the canonical JSON of a manifest."""
    return "sha256:" + hashlib.sha256(canonical_json(manifest)).hexdigest()


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ManifestError(f"the key `{key[:60]}` appears twice in one object")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ManifestError(f"`{name}` is not JSON")


def loads_strict(data: bytes | str) -> Any:
    """Parse JSON, refusing duplicate keys and NaN/Infinity (both hide what was signed)."""
    try:
        return json.loads(data, object_pairs_hook=_unique_pairs, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise ManifestError("not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"not JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise ManifestError("nested too deeply") from None


@functools.total_ordering
class Version:
    """A semantic version (semver.org 2.0.0), ordered by semver precedence."""

    def __init__(self, text: str) -> None:
        match = _SEMVER_RE.fullmatch(text)
        if match is None:
            raise ValueError(
                f"`{text[:40]}` is not a semantic version such as `1.4.2` or `2.0.0-rc.1`"
            )
        self.text = text
        self.core = (int(match[1]), int(match[2]), int(match[3]))
        self.pre: tuple[int | str, ...] = tuple(
            int(part) if part.isdigit() else part for part in (match[4] or "").split(".") if part
        )

    def _key(self) -> tuple[Any, ...]:
        # A pre-release sorts before its release; numeric identifiers before alphanumeric ones,
        # numerically; a longer list of equal identifiers after a shorter one. Build metadata
        # does not count.
        pre = tuple((0, p, "") if isinstance(p, int) else (1, 0, p) for p in self.pre)
        return (self.core, 0 if self.pre else 1, pre)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Version) and self._key() == other._key()

    def __lt__(self, other: Version) -> bool:
        return self._key() < other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Version({self.text!r})"


def _size(value: object) -> object:
    return parse_size(value)


def _duration(value: object) -> object:
    return parse_duration(value)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ResourceLimits(_Model):
    """Resources of a plugin container, in the units of the job file."""

    cpus: float = Field(ge=0.05, le=64, description="CPU quota, in CPUs.")
    memory: Annotated[int, BeforeValidator(_size)] = Field(
        ge=16 << 20, le=64 << 30, description="Memory limit, a size such as `1GiB`."
    )
    pids: int = Field(ge=8, le=4096, description="Most processes and threads at once.")
    timeout: Annotated[float, BeforeValidator(_duration)] = Field(
        ge=1, le=7 * 86400, description="Wall-clock limit, a duration such as `1h`."
    )


RESOURCE_FIELDS = ("cpus", "memory", "pids", "timeout")


class ManifestResources(_Model):
    """The resources a plugin runs with by default, and the most a job may grant it."""

    default: ResourceLimits = Field(description="Used for every limit the job does not set.")
    max: ResourceLimits = Field(description="The most a job may grant.")

    @model_validator(mode="after")
    def _default_within_max(self) -> ManifestResources:
        for name in RESOURCE_FIELDS:
            if getattr(self.default, name) > getattr(self.max, name):
                raise ValueError(f"`default.{name}` is above `max.{name}`")
        return self


def _name(value: object) -> object:
    if isinstance(value, str) and not _NAME_RE.fullmatch(value):
        raise ValueError(
            "expected `publisher/plugin` in lowercase letters, digits, `.`, `_` or `-`, "
            "such as `acme/pg-reader`"
        )
    return value


def _version(value: object) -> object:
    if isinstance(value, str):
        Version(value)
    return value


def _destination(value: object) -> object:
    """A declared destination: `host:port`, or a pattern (`*:5432`, `*.example.com:443`,
    `db.example.com:*`, `*:*`) for a generic connector whose job names the actual host."""
    if isinstance(value, str) and "*" in value:
        host, colon, port = value.rpartition(":")
        if not colon or not (port == "*" or (port.isdigit() and 1 <= int(port) <= 65535)):
            raise ValueError("expected `host:port`, where port is a number or `*`")
        if host != "*":
            if "*" in host.removeprefix("*."):
                raise ValueError("only `*` or a leading `*.` may stand for part of a host")
            concrete = host.replace("*.", "x.", 1) + ":1"
            if parse_destination(concrete) != concrete:
                raise ValueError("write the host in lower case")
        return value
    normalised = parse_destination(value)
    if normalised != value:
        raise ValueError(f"write the destination as `{normalised}`")
    return value


def network_allows(declared: tuple[str, ...], destination: str) -> bool:
    """Whether a normalised grant `host:port` falls within the manifest's declared destinations.

    `*` as the host matches any host (names and addresses); `*.example.com` matches names
    under example.com (not example.com itself); `*` as the port matches any port.
    """
    host, _, port = destination.rpartition(":")
    for entry in declared:
        if entry == destination:
            return True
        want_host, _, want_port = entry.rpartition(":")
        if want_port not in ("*", port):
            continue
        if want_host in ("*", host):
            return True
        if want_host.startswith("*.") and host.endswith(want_host[1:]) and not host.startswith("["):
            return True
    return False


def _secret_key(value: object) -> object:
    if isinstance(value, str) and not _SECRET_KEY_RE.fullmatch(value):
        raise ValueError("expected the name of a config key, such as `password`")
    return value


class Manifest(_Model):
    """What a plugin image is and what it may be granted; stored in its `org.dativo.manifest`
    label and covered by its signature."""

    manifest_version: Literal[1] = Field(description="Version of the manifest format; `1`.")
    name: Annotated[str, BeforeValidator(_name)] = Field(
        description="`publisher/plugin`, the name trust policies scope publishers by."
    )
    version: Annotated[str, BeforeValidator(_version)] = Field(
        description="Semantic version; a lower one than already run is refused (rollback)."
    )
    kind: Literal["reader", "writer"] = Field(description="The role the plugin plays.")
    protocol: Literal[1] = Field(description="The Dativo protocol version it speaks.")
    entrypoint: tuple[str, ...] = Field(
        min_length=1, description="The image's Entrypoint + Cmd, exactly."
    )
    description: str = Field(default="", max_length=2000, description="One paragraph.")
    network: tuple[Annotated[str, BeforeValidator(_destination)], ...] = Field(
        default=(),
        max_length=64,
        description=(
            "`host:port` destinations a job may grant; `*` stands for any host or any port "
            "(`*:5432`), `*.example.com` for any name under example.com."
        ),
    )
    resources: ManifestResources = Field(description="Default and maximum resources.")
    config_schema: dict[str, Any] = Field(
        default_factory=dict, description="JSON Schema of the plugin's `config`."
    )
    secrets: tuple[Annotated[str, BeforeValidator(_secret_key)], ...] = Field(
        default=(), max_length=64, description="Config keys that hold secrets."
    )

    @property
    def semver(self) -> Version:
        return Version(self.version)


def describe_validation_error(exc: ValidationError) -> str:
    """pydantic's errors as `field: message` lines, without echoing values (they may be long)."""
    lines = []
    for error in exc.errors(include_url=False):
        where = ""
        for part in error["loc"]:
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else part)
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"`{where}`: {message}" if where else message)
    return "; ".join(lines)


def parse_manifest(raw: object) -> Manifest:
    """Validate a parsed manifest object.

    Raises:
        ManifestError: what is wrong, field by field.
    """
    if not isinstance(raw, dict):
        raise ManifestError("a manifest is a JSON object")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise ManifestError(describe_validation_error(exc)) from None
