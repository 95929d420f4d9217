"""The pydantic models of a job file (version 1) and the validators of their values."""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PrivateAttr,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from dativo.config._units import (
    DURATION_PATTERN,
    SIZE_PATTERN,
    GiB,
    MiB,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)

__all__ = [
    "READER_BUILTINS",
    "WRITER_BUILTINS",
    "BuiltinPlugin",
    "BuiltinReader",
    "BuiltinWriter",
    "CatalogSpec",
    "EncryptionSpec",
    "FileKeyService",
    "IcebergSpec",
    "ImagePlugin",
    "Isolation",
    "JobConfig",
    "KeyServiceSpec",
    "KmsKeyService",
    "PartitionField",
    "Pkcs11KeyService",
    "PluginSpec",
    "Problem",
    "PythonPlugin",
    "ReaderSpec",
    "Resources",
    "RunSpec",
    "SourceSpec",
    "StateSpec",
    "TargetSpec",
    "WriterSpec",
    "parse_destination",
]

#: Names of the built-in plugins, per role, in the order they are documented.
READER_BUILTINS: tuple[str, ...] = ("files", "generate", "postgres", "http")
WRITER_BUILTINS: tuple[str, ...] = ("parquet", "null")

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_IMPLEMENTATION_PATTERN = rf"^{_IDENT}(?:\.{_IDENT})*:{_IDENT}$"
_IMPLEMENTATION_RE = re.compile(_IMPLEMENTATION_PATTERN)
_USER_RE = re.compile(r"(\d+):(\d+)")
_MAX_ID = 2**32 - 2  # 2**32 - 1 is (uid_t)-1, "no id"

# Docker image references (distribution/reference grammar, restricted to sha256 digests).
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY_RE = re.compile(rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
_IMAGE_EXAMPLES = (
    "`myorg/reader:1.2`, `myorg/reader@sha256:<64 hex digits>` or `sha256:<64 hex digits>`"
)


class Problem(ValueError):
    """A validator's complaint, phrased as what is expected ("expected a size such as ...").

    The loader prefixes it with the field path and, unless `show_input` is False, with the value
    found (masked when the key looks secret).
    """

    def __init__(self, message: str, *, show_input: bool = True) -> None:
        super().__init__(message)
        self.show_input = show_input


# --------------------------------------------------------------------------------------------
# Bounded numbers, sizes and durations


@dataclass(frozen=True)
class _Bounded:
    """`Annotated` marker: parse a number, size or duration and check it lies in [lo, hi]."""

    kind: Literal["int", "float", "size", "duration"]
    lo: float
    hi: float
    unit: str = ""

    def _range(self) -> str:
        if self.kind == "size":
            return f"from `{format_size(int(self.lo))}` to `{format_size(int(self.hi))}`"
        if self.kind == "duration":
            return f"from `{format_duration(self.lo)}` to `{format_duration(self.hi)}`"
        unit = f" {self.unit}" if self.unit else ""
        return f"from {_number(self.lo)} to {_number(self.hi)}{unit}"

    def _what(self) -> str:
        return {
            "int": "a whole number",
            "float": "a number",
            "size": "a size",
            "duration": "a duration",
        }[self.kind]

    def validate(self, value: object) -> int | float:
        number: int | float
        if self.kind == "size":
            try:
                number = parse_size(value)
            except ValueError as exc:
                raise Problem(f"{exc}, {self._range()}") from None
        elif self.kind == "duration":
            try:
                number = parse_duration(value)
            except ValueError as exc:
                raise Problem(f"{exc}, {self._range()}") from None
        elif isinstance(value, bool) or not isinstance(value, int | float):
            quoted = " (without quotes)" if isinstance(value, str) else ""
            raise Problem(f"expected {self._what()}{quoted} {self._range()}")
        elif self.kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise Problem(f"expected a whole number {self._range()}")
            number = int(value)
        else:
            if not math.isfinite(value):
                raise Problem(f"expected a number {self._range()}")
            number = float(value)
        if not self.lo <= number <= self.hi:
            raise Problem(f"expected {self._what()} {self._range()}")
        return number

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.no_info_plain_validator_function(self.validate)

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        if self.kind == "int":
            return {"type": "integer", "minimum": int(self.lo), "maximum": int(self.hi)}
        if self.kind == "float":
            return {"type": "number", "minimum": self.lo, "maximum": self.hi}
        if self.kind == "size":
            return {
                "anyOf": [
                    {"type": "integer", "minimum": int(self.lo), "maximum": int(self.hi)},
                    {"type": "string", "pattern": SIZE_PATTERN},
                ],
            }
        return {
            "anyOf": [
                {"type": "number", "minimum": self.lo, "maximum": self.hi},
                {"type": "string", "pattern": DURATION_PATTERN},
            ],
        }


def _number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


def _check_path(value: object) -> object:
    if isinstance(value, Path):
        return value
    if not isinstance(value, str):
        raise Problem("expected a path such as `./data`")
    if not value.strip():
        raise Problem("expected a path such as `./data`; an empty string is not a path")
    if "\x00" in value:
        raise Problem("a path cannot contain a NUL character")
    return value


_HostPath = Annotated[Path, BeforeValidator(_check_path)]


def _check_implementation(value: object) -> object:
    if isinstance(value, str) and not _IMPLEMENTATION_RE.fullmatch(value):
        hint = " (the `:ClassName` part is missing)" if ":" not in value else ""
        raise Problem(
            f"expected `module.path:ClassName`, such as `my_plugins.orders:OrdersReader`{hint}"
        )
    return value


def _short_image(image: str) -> str:
    if image.startswith("sha256:"):
        return image[: len("sha256:") + 12] + "\u2026"
    if "@" in image:
        name, digest = image.split("@", 1)
        return f"{name}@{digest[: len('sha256:') + 12]}\u2026"
    return image


def _check_image(value: object) -> object:
    if not isinstance(value, str):
        return value  # pydantic reports the type
    if not value:
        raise Problem(f"expected a Docker image reference such as {_IMAGE_EXAMPLES}")
    if value != value.strip():
        raise Problem("an image reference cannot start or end with spaces")
    if value.startswith("sha256:"):
        if not _DIGEST_RE.fullmatch(value):
            raise Problem("an image ID is `sha256:` followed by exactly 64 lowercase hex digits")
        return value
    name, at, digest = value.partition("@")
    if at and not _DIGEST_RE.fullmatch(digest):
        raise Problem(
            "the digest after `@` must be `sha256:` followed by exactly 64 lowercase hex digits "
            "(copy it from `docker buildx imagetools inspect` or `docker images --digests`)"
        )
    repository, tag = name, ""
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:
        repository, tag = name[:colon], name[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise Problem(
                "a tag (after the last `:`) is 1 to 128 letters, digits, `_`, `.` or `-`, "
                f"not starting with `.` or `-`; expected {_IMAGE_EXAMPLES}"
            )
    if len(repository) > 255 or not _REPOSITORY_RE.fullmatch(repository):
        lower = " (repository names are lowercase)" if repository != repository.lower() else ""
        raise Problem(f"not a valid Docker image reference{lower}; expected {_IMAGE_EXAMPLES}")
    return value


# --------------------------------------------------------------------------------------------
# Models


class _Model(BaseModel):
    """Base of every job-file model: immutable, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Resources(_Model):
    """Limits the sandbox enforces on one plugin container."""

    cpus: Annotated[float, _Bounded("float", 0.05, 64, "CPUs")] = Field(
        default=1.0,
        description="CPU quota of the plugin, in CPUs (fractions allowed), 0.05 to 64.",
        examples=[0.5, 2],
    )
    memory: Annotated[int, _Bounded("size", 16 * MiB, 64 * GiB)] = Field(
        default=GiB,
        json_schema_extra={"default": "1GiB"},
        description=(
            "Memory limit of the plugin (no swap beyond it), 16MiB to 64GiB. A size: bytes as "
            "an integer, or a string such as `512MiB`, `2GiB`, `100MB` (decimal) or `512m` "
            "(Docker style, binary). Stored as bytes."
        ),
        examples=["512MiB", "2GiB"],
    )
    pids: Annotated[int, _Bounded("int", 8, 4096, "processes")] = Field(
        default=128,
        description="Most processes and threads the plugin may run at once, 8 to 4096.",
    )
    timeout: Annotated[float, _Bounded("duration", 1, 7 * 86400)] = Field(
        default=3600.0,
        json_schema_extra={"default": "1h"},
        description=(
            "Wall-clock limit of the plugin, 1s to 7d; it is stopped when exceeded. A duration: "
            "seconds as a number, or a string such as `30s`, `5m`, `1h30m`, `2d`, `500ms`."
        ),
        examples=["30m", "2h"],
    )
    tmpfs: Annotated[int, _Bounded("size", 1 * MiB, 16 * GiB)] = Field(
        default=64 * MiB,
        json_schema_extra={"default": "64MiB"},
        description=(
            "Size of the writable in-memory `/tmp` of the plugin, 1MiB to 16GiB; it counts "
            "against `memory`. The rest of the container file system is read-only."
        ),
        examples=["256MiB"],
    )


class Isolation(_Model):
    """How the plugin container is isolated from the host."""

    runtime: Literal["runc", "runsc"] = Field(
        default="runc",
        description=(
            "OCI runtime of the container: `runc` (the default) or `runsc` (gVisor, a user-space "
            "kernel; stronger isolation, must be installed on the host)."
        ),
    )
    user: str = Field(
        default="65534:65534",
        description=(
            "Numeric `UID:GID` the plugin runs as; quote it in YAML. Uid 0 and gid 0 are "
            "refused: plugins never run as root."
        ),
        examples=["65534:65534", "1000:1000"],
        json_schema_extra={"pattern": r"^[0-9]+:[0-9]+$"},
    )

    @field_validator("user", mode="before")
    @classmethod
    def _check_user(cls, value: object) -> object:
        if isinstance(value, int) and not isinstance(value, bool):
            raise Problem(
                'expected a quoted `UID:GID` string such as `"65534:65534"`; YAML reads some '
                "unquoted `a:b` values as base-60 numbers"
            )
        if not isinstance(value, str):
            raise Problem("expected a `UID:GID` string such as `65534:65534`")
        match = _USER_RE.fullmatch(value.strip())
        if match is None:
            raise Problem(
                "expected numeric `UID:GID` such as `65534:65534` (user and group names are "
                "not resolved)"
            )
        uid, gid = int(match[1]), int(match[2])
        if uid == 0 or gid == 0:
            raise Problem(
                "plugins never run as root: uid 0 and gid 0 are refused, because root in the "
                "container is one step from root on the host; use an unprivileged id such as "
                "`65534:65534` (nobody)"
            )
        if uid > _MAX_ID or gid > _MAX_ID:
            raise Problem(f"uid and gid must be from 1 to {_MAX_ID}")
        return f"{uid}:{gid}"

    @property
    def uid(self) -> int:
        """The numeric user id."""
        return int(self.user.split(":", 1)[0])

    @property
    def gid(self) -> int:
        """The numeric group id."""
        return int(self.user.split(":", 1)[1])


_HOST_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_HOSTNAME_RE = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*")
_DESTINATION_HINT = (
    "`host:port` such as `db.example.com:5432`, `10.0.0.7:443` or `[2001:db8::1]:443`"
)


def parse_destination(value: object) -> str:
    """Check a network destination `host:port` and return it normalised (host lower-cased).

    Raises:
        ValueError: not a destination; the message says what one looks like.
    """
    if not isinstance(value, str):
        raise ValueError(f"expected {_DESTINATION_HINT}")
    host, colon, port = value.strip().rpartition(":")
    if not colon or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected {_DESTINATION_HINT}, with a port from 1 to 65535")
    host = host.lower()
    if host.startswith("[") and host.endswith("]"):
        try:
            host = f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError:
            raise ValueError(
                f"`{host}` is not an IPv6 address; expected {_DESTINATION_HINT}"
            ) from None
    elif len(host) > 253 or not _HOSTNAME_RE.fullmatch(host):
        raise ValueError(
            f"`{host[:80]}` is not a host name or address; expected {_DESTINATION_HINT}"
        )
    return f"{host}:{int(port)}"


def _check_destination(value: object) -> object:
    try:
        return parse_destination(value)
    except ValueError as exc:
        raise Problem(str(exc)) from None


_Destination = Annotated[str, BeforeValidator(_check_destination)]


class _PluginBase(_Model):
    config: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Settings of the plugin, passed to its `initialize(config, context)` as given. "
            "Which keys it takes is up to the plugin."
        ),
    )
    resources: Resources = Field(
        default_factory=Resources, description="Resource limits of the plugin container."
    )
    isolation: Isolation = Field(
        default_factory=Isolation, description="Isolation settings of the plugin container."
    )
    network: tuple[_Destination, ...] = Field(
        default=(),
        description=(
            "Network destinations (`host:port`) the plugin is granted; default none. Each must "
            "be declared in the plugin's signed manifest, or the run is refused before any "
            "container starts."
        ),
        examples=[["db.example.com:5432"]],
    )

    @field_validator("config", mode="after")
    @classmethod
    def _check_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        where = _plain_secret(value, "")
        if where is not None:
            raise Problem(
                f"`{where}` looks like a secret written in plain text; write `${{ENV_VAR}}` "
                "and set the variable for `dativo run` (the supervisor expands it and hands it "
                "to the plugin over its socket only)",
                show_input=False,
            )
        return value

    @property
    def display_name(self) -> str:
        """A short name for messages: `builtin:files`, `image:myorg/pg@sha256:abcd…`."""
        raise NotImplementedError


_PLUGIN_SECRET_WORDS = ("password", "passwd", "secret", "token", "credential", "api_key", "apikey")


def _plain_secret(value: object, path: str) -> str | None:
    """The path of the first config entry whose key names a secret but whose value is a plain
    string rather than a `${VAR}` reference, or None."""
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            folded = str(key).lower().replace("-", "_")
            if isinstance(item, str) and item:
                if folded in ("authorization", "proxy_authorization"):
                    # `Bearer ${TOKEN}`: the scheme may be written out, the credential not.
                    if _ENV_REF.search(item) is None:
                        return where
                elif (
                    any(word in folded for word in _PLUGIN_SECRET_WORDS)
                    and _ENV_REF.fullmatch(item) is None
                ):
                    return where
            found = _plain_secret(item, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _plain_secret(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


class BuiltinPlugin(_PluginBase):
    """A plugin shipped with Dativo, run from Dativo's own plugin image."""

    type: Literal["builtin"] = Field(description="`builtin`: a plugin shipped with Dativo.")
    name: str = Field(description="Name of the built-in plugin.")

    #: The role whose built-ins `name` must name; None accepts any built-in.
    role: ClassVar[Literal["reader", "writer"] | None] = None

    @field_validator("name", mode="before")
    @classmethod
    def _check_name(cls, value: object) -> object:
        readers = ", ".join(f"`{n}`" for n in READER_BUILTINS)
        writers = ", ".join(f"`{n}`" for n in WRITER_BUILTINS)
        valid = {"reader": READER_BUILTINS, "writer": WRITER_BUILTINS}
        if cls.role is None:
            allowed, listing = (
                READER_BUILTINS + WRITER_BUILTINS,
                (f"built-in readers: {readers}; built-in writers: {writers}"),
            )
        else:
            allowed = valid[cls.role]
            listing = f"built-in {cls.role}s: {readers if cls.role == 'reader' else writers}"
        if value in allowed:
            return value
        if value is None and "null" in allowed:
            raise Problem(
                'YAML reads an unquoted `null` as an empty value; write `name: "null"`; ' + listing,
                show_input=False,
            )
        if cls.role is not None and isinstance(value, str):
            other: Literal["reader", "writer"] = "writer" if cls.role == "reader" else "reader"
            if value in valid[other]:
                raise Problem(
                    f"`{value}` is a built-in {other}, not a {cls.role}; {listing}",
                    show_input=False,
                )
        own = "; for your own plugin use `type: image` or `type: python`"
        if not isinstance(value, str):
            raise Problem(f"expected the name of a built-in plugin; {listing}{own}")
        raise Problem(f"not a built-in plugin; {listing}{own}")

    @property
    def display_name(self) -> str:
        return f"builtin:{self.name}"


class BuiltinReader(BuiltinPlugin):
    """A reader shipped with Dativo."""

    name: Literal["files", "generate", "postgres", "http"] = Field(
        description=(
            "`files` reads the input files mounted from `source.files`; `generate` produces "
            "rows without any input; `postgres` reads a PostgreSQL table or query (grant its "
            "`host:port` in `network`); `http` reads a JSON HTTP API (grant its `host:port` too)."
        )
    )
    role: ClassVar[Literal["reader", "writer"] | None] = "reader"


class BuiltinWriter(BuiltinPlugin):
    """A writer shipped with Dativo."""

    name: Literal["parquet", "null"] = Field(
        description=(
            "`parquet` writes Parquet files for the supervisor to publish into `target.path`; "
            '`null` discards every row (quote it in YAML: `name: "null"`).'
        )
    )
    role: ClassVar[Literal["reader", "writer"] | None] = "writer"


class ImagePlugin(_PluginBase):
    """A plugin packaged as a Docker image that runs the Dativo plugin host."""

    type: Literal["image"] = Field(description="`image`: a plugin packaged as a Docker image.")
    image: Annotated[str, BeforeValidator(_check_image)] = Field(
        description=(
            "Docker image reference: `name[:tag]`, `name@sha256:<64 hex digits>` (pinned, "
            "recommended) or an image ID `sha256:<64 hex digits>`."
        ),
        examples=["ghcr.io/myorg/pg-reader@sha256:" + "0" * 64, "myorg/pg-reader:1.4"],
    )
    implementation: Annotated[str, BeforeValidator(_check_implementation)] | None = Field(
        default=None,
        description=(
            "`module.path:ClassName` of the plugin class inside the image, when the image does "
            "not declare it itself."
        ),
        examples=["pg_reader.plugin:PostgresReader"],
        json_schema_extra={"pattern": _IMPLEMENTATION_PATTERN},
    )

    @property
    def display_name(self) -> str:
        return f"image:{_short_image(self.image)}"


class PythonPlugin(_PluginBase):
    """A plugin given as Python code, run in Dativo's plugin image."""

    type: Literal["python"] = Field(description="`python`: a plugin class written in Python.")
    implementation: Annotated[str, BeforeValidator(_check_implementation)] = Field(
        description="`module.path:ClassName` of the plugin class.",
        examples=["my_plugins.orders:OrdersReader"],
        json_schema_extra={"pattern": _IMPLEMENTATION_PATTERN},
    )
    path: _HostPath | None = Field(
        default=None,
        description=(
            "Host directory holding the plugin's Python code, mounted read-only and put on "
            "`sys.path`. Relative to the job file's directory. Omit it when the module is "
            "already importable in the plugin image."
        ),
        examples=["./plugins"],
    )

    @property
    def display_name(self) -> str:
        return f"python:{self.implementation}"


_PLUGIN_DESCRIPTION = (
    "Which plugin to run and how: `type` is `builtin`, `image` or `python`; every type also "
    "takes `config`, `resources` and `isolation`."
)

#: Any plugin spec, whatever its role.
PluginSpec = Annotated[BuiltinPlugin | ImagePlugin | PythonPlugin, Field(discriminator="type")]
#: A plugin spec in the reader role (built-in names limited to readers).
ReaderSpec = Annotated[BuiltinReader | ImagePlugin | PythonPlugin, Field(discriminator="type")]
#: A plugin spec in the writer role (built-in names limited to writers).
WriterSpec = Annotated[BuiltinWriter | ImagePlugin | PythonPlugin, Field(discriminator="type")]


class SourceSpec(_Model):
    """Where data comes from."""

    files: _HostPath | None = Field(
        default=None,
        description=(
            "Host directory of input files, mounted read-only at `/data/in` for the reader. "
            "Relative to the job file's directory."
        ),
        examples=["./data"],
    )
    reader: ReaderSpec = Field(description=f"The reader plugin. {_PLUGIN_DESCRIPTION}")


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_BAD_DOLLAR = re.compile(r"\$(?!\{[A-Za-z_][A-Za-z0-9_]*\})")
_ICEBERG_NAME = r"[A-Za-z_][A-Za-z0-9_]{0,127}"
_ICEBERG_NAME_RE = re.compile(_ICEBERG_NAME)
_NAMESPACE_RE = re.compile(rf"{_ICEBERG_NAME}(?:\.{_ICEBERG_NAME})*")
_TRANSFORM_RE = re.compile(r"(identity|year|month|day|hour)|(bucket|truncate)\[([1-9][0-9]{0,8})\]")
_S3_URL_RE = re.compile(r"s3a?://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/[^\x00]*)?")
_SECRET_PROPERTY_WORDS = ("password", "secret", "token", "credential", "key")


def _check_env_refs(value: str) -> None:
    if _BAD_DOLLAR.search(value):
        raise Problem(
            "a `$` must start an environment variable reference `${NAME}` (letters, digits "
            "and `_`)",
            show_input=False,
        )


def _plain_secret_in_uri(uri: str) -> bool:
    """True when the URI's user-info holds a password that is not a `${VAR}` reference."""
    _, sep, rest = uri.partition("://")
    if not sep:
        return False
    authority = rest.split("/", 1)[0]
    userinfo, at, _ = authority.rpartition("@")
    if not at or ":" not in userinfo:
        return False
    password = userinfo.split(":", 1)[1]
    return bool(password) and _ENV_REF.fullmatch(password) is None


def _check_s3_url(value: str) -> str:
    match = _S3_URL_RE.fullmatch(value)
    if match is None:
        raise Problem(
            "expected `s3://bucket/prefix` (a bucket name of 3 to 63 lowercase letters, digits, "
            "`.` or `-`)"
        )
    prefix = (match[2] or "").strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise Problem("the S3 prefix cannot hold empty, `.` or `..` parts")
    return f"s3://{match[1]}" + (f"/{prefix}" if prefix else "")


def _check_location(value: object) -> object:
    """A local path, or an `s3://bucket/prefix` URL (normalised: no trailing `/`)."""
    if isinstance(value, str) and value.lower().startswith(("s3://", "s3a://")):
        return _check_s3_url(value)
    checked = _check_path(value)
    return str(checked) if isinstance(checked, Path) else checked


_Location = Annotated[str, BeforeValidator(_check_location)]


class PartitionField(_Model):
    """One field of an Iceberg partition spec."""

    column: str = Field(
        description="Source column of the partition field (a top-level column of the data).",
        examples=["order_date"],
    )
    transform: str = Field(
        default="identity",
        description=(
            "Iceberg partition transform: `identity`, `year`, `month`, `day`, `hour`, "
            "`bucket[N]` or `truncate[N]` (N from 1 to 999,999,999)."
        ),
        examples=["day", "bucket[16]"],
        json_schema_extra={"pattern": rf"^(?:{_TRANSFORM_RE.pattern})$"},
    )

    @field_validator("column", mode="before")
    @classmethod
    def _check_column(cls, value: object) -> object:
        if not isinstance(value, str) or not value.strip():
            raise Problem("expected the name of a column, such as `order_date`")
        return value

    @field_validator("transform", mode="before")
    @classmethod
    def _check_transform(cls, value: object) -> object:
        if isinstance(value, str) and _TRANSFORM_RE.fullmatch(value.strip().lower()):
            return value.strip().lower()
        raise Problem(
            "expected an Iceberg transform: `identity`, `year`, `month`, `day`, `hour`, "
            "`bucket[N]` or `truncate[N]`, such as `bucket[16]`"
        )


class CatalogSpec(_Model):
    """The Iceberg catalog the supervisor commits to."""

    type: Literal["sql", "rest"] = Field(
        default="sql",
        description=(
            "`sql`: a SQL catalog (SQLite by default, or PostgreSQL for production); `rest`: "
            "an Iceberg REST catalog."
        ),
    )
    uri: str | None = Field(
        default=None,
        description=(
            "Where the catalog is. `sql`: an SQLAlchemy URL; default "
            "`sqlite:///<job dir>/.dativo/catalog.db`; PostgreSQL: "
            "`postgresql+psycopg://user:${PGPASSWORD}@host:5432/db`. `rest`: the catalog's "
            "`http(s)://` URL (required). A password is never written in plain text: use a "
            "`${ENV_VAR}` reference, expanded by the supervisor when it commits."
        ),
        examples=["postgresql+psycopg://dativo:${PGPASSWORD}@db:5432/lake"],
    )
    name: str = Field(
        default="dativo",
        description="Name of the catalog (an SQL catalog keeps it in every row it writes).",
        json_schema_extra={"pattern": rf"^{_ICEBERG_NAME}$"},
    )
    properties: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "More catalog properties handed to pyiceberg (such as `warehouse` for a REST "
            "catalog). A property whose name suggests a secret (`token`, `credential`, "
            "`password`, `secret`, `key`) must be a `${ENV_VAR}` reference."
        ),
        examples=[{"token": "${ICEBERG_TOKEN}"}],
    )

    @field_validator("uri", mode="before")
    @classmethod
    def _check_uri(cls, value: object) -> object:
        if value is None:
            return value
        if not isinstance(value, str) or not value.strip():
            raise Problem("expected a URL such as `sqlite:///catalog.db`", show_input=False)
        _check_env_refs(value)
        if _plain_secret_in_uri(value):
            raise Problem(
                "the URL holds a password in plain text; put it in an environment variable "
                "and write `${NAME}` in its place, such as `postgresql+psycopg://user:"
                "${PGPASSWORD}@host/db`",
                show_input=False,
            )
        return value

    @field_validator("name", mode="before")
    @classmethod
    def _check_catalog_name(cls, value: object) -> object:
        if isinstance(value, str) and _ICEBERG_NAME_RE.fullmatch(value):
            return value
        raise Problem("expected 1 to 128 letters, digits or `_`, not starting with a digit")

    @field_validator("properties", mode="before")
    @classmethod
    def _check_properties(cls, value: object) -> object:
        if not isinstance(value, dict):
            return value  # pydantic reports the type
        for key, item in value.items():
            if not isinstance(key, str) or not isinstance(item, str):
                raise Problem("expected a mapping of string names to string values")
            _check_env_refs(item)
            folded = key.lower().replace("-", "_").replace(".", "_")
            secret = any(word in folded for word in _SECRET_PROPERTY_WORDS)
            if secret and _ENV_REF.fullmatch(item) is None:
                raise Problem(
                    f"`{key}` looks like a secret: write `${{ENV_VAR}}` and set the variable "
                    "for the supervisor instead of writing the value in the job file",
                    show_input=False,
                )
        return value


class IcebergSpec(_Model):
    """How the supervisor commits the staged files to an Iceberg table."""

    catalog: CatalogSpec = Field(
        default_factory=CatalogSpec,
        description="The catalog: SQL (SQLite by default, PostgreSQL) or REST.",
    )
    warehouse: _Location | None = Field(
        default=None,
        description=(
            "Where new tables keep their data and metadata: a local directory (default "
            "`<job dir>/warehouse`, relative to the job file's directory) or "
            "`s3://bucket/prefix`. S3 credentials come from the usual AWS sources (environment, "
            "profile, instance role), never from the job file."
        ),
        examples=["./warehouse", "s3://lake/warehouse"],
    )
    namespace: str = Field(
        default="default",
        description="Namespace of the table; dots separate levels (`sales.eu`).",
        json_schema_extra={"pattern": rf"^{_NAMESPACE_RE.pattern}$"},
    )
    table: str | None = Field(
        default=None,
        description=(
            "Name of the table, created on the first run from the data's schema. Default: the "
            "job's name with `-` turned into `_`."
        ),
        examples=["orders"],
        json_schema_extra={"pattern": rf"^{_ICEBERG_NAME}$"},
    )
    mode: Literal["append", "overwrite", "upsert"] = Field(
        default="append",
        description=(
            "`append` adds the run's rows; `overwrite` replaces the whole table with them; "
            "`upsert` updates the rows whose `key` matches and inserts the others."
        ),
    )
    key: tuple[str, ...] = Field(
        default=(),
        description="Columns that identify a row; required with `mode: upsert`, unused otherwise.",
        examples=[["order_id"]],
    )
    partition_by: tuple[PartitionField, ...] = Field(
        default=(),
        description=(
            "Partition spec of a new table: a list of `{column, transform}`. An existing "
            "table must already be partitioned this way."
        ),
        examples=[[{"column": "order_date", "transform": "day"}]],
    )

    @field_validator("namespace", mode="before")
    @classmethod
    def _check_namespace(cls, value: object) -> object:
        if isinstance(value, str) and _NAMESPACE_RE.fullmatch(value):
            return value
        raise Problem(
            "expected one or more names of letters, digits and `_`, separated by dots, such "
            "as `sales` or `sales.eu`"
        )

    @field_validator("table", mode="before")
    @classmethod
    def _check_table(cls, value: object) -> object:
        if value is None or (isinstance(value, str) and _ICEBERG_NAME_RE.fullmatch(value)):
            return value
        raise Problem(
            "expected 1 to 128 letters, digits or `_`, not starting with a digit, such as `orders`"
        )

    @field_validator("key", mode="before")
    @classmethod
    def _check_key(cls, value: object) -> object:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple):
            if not all(isinstance(v, str) and v.strip() for v in value):
                raise Problem("expected a list of column names, such as `[order_id]`")
            if len(set(value)) != len(value):
                raise Problem("names a column twice; list each key column once")
        return value

    @field_validator("partition_by")
    @classmethod
    def _check_partition_by(cls, value: tuple[PartitionField, ...]) -> tuple[PartitionField, ...]:
        seen = set()
        for item in value:
            if (item.column, item.transform) in seen:
                raise Problem(
                    f"partitions by `{item.transform}` of `{item.column}` twice", show_input=False
                )
            seen.add((item.column, item.transform))
        return value

    @model_validator(mode="after")
    def _check_mode(self) -> IcebergSpec:
        if self.mode == "upsert" and not self.key:
            raise Problem(
                "`mode: upsert` needs `key`: the columns that identify a row, such as "
                "`key: [order_id]`",
                show_input=False,
            )
        if self.key and self.mode != "upsert":
            raise Problem(
                f"`key` is used by `mode: upsert` only; remove it, or set `mode: upsert` (the "
                f"mode is `{self.mode}`)",
                show_input=False,
            )
        if self.catalog.type == "rest" and not self.catalog.uri:
            raise Problem(
                "a `rest` catalog needs `catalog.uri`, such as `https://catalog.example.com`",
                show_input=False,
            )
        return self


_KEY_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./:@+=-]{0,255}")


def _check_key_id(value: object) -> object:
    if isinstance(value, str) and _KEY_ID_RE.fullmatch(value):
        return value
    raise Problem(
        "expected a master key id: 1 to 256 letters, digits or `_./:@+=-`, starting with a "
        "letter or digit, such as `pii`, `alias/dativo-pii` or a KMS key ARN"
    )


_KeyId = Annotated[str, BeforeValidator(_check_key_id)]


class FileKeyService(_Model):
    """Master keys in a local JSON key file (air-gapped sites)."""

    type: Literal["file"] = Field(description="`file`: a local key file.")
    path: _HostPath = Field(
        description=(
            "The key file (relative to the job file's directory). It must be owned by the "
            "user running Dativo and readable by that user only (`chmod 600`); anything else "
            "is refused."
        ),
        examples=["./keys/dativo-keys.json"],
    )


class KmsKeyService(_Model):
    """Master keys in AWS KMS or a KMS-compatible server."""

    type: Literal["kms"] = Field(description="`kms`: AWS KMS through boto3.")
    region: str | None = Field(
        default=None,
        description="AWS region; default `AWS_REGION`, `AWS_DEFAULT_REGION`, else `us-east-1`.",
        examples=["eu-west-1"],
    )
    endpoint_url: str | None = Field(
        default=None,
        description=(
            "KMS endpoint; default `AWS_ENDPOINT_URL_KMS`, `AWS_ENDPOINT_URL`, else AWS's own. "
            "Credentials always come from the usual AWS chain, never from the job file."
        ),
        examples=["https://kms.eu-west-1.amazonaws.com"],
    )

    @field_validator("endpoint_url", mode="before")
    @classmethod
    def _check_endpoint(cls, value: object) -> object:
        if value is None:
            return value
        if not isinstance(value, str) or not re.fullmatch(r"https?://[^\s@]+", value):
            raise Problem("expected an `http(s)://host[:port]` URL without credentials")
        return value


class Pkcs11KeyService(_Model):
    """Master keys in a PKCS#11 HSM; each version is an AES key labelled `<key id>.v<N>`."""

    type: Literal["pkcs11"] = Field(description="`pkcs11`: a PKCS#11 token (HSM).")
    module: _HostPath = Field(
        description="The PKCS#11 module (shared library) of the HSM.",
        examples=["/usr/lib/softhsm/libsofthsm2.so"],
    )
    token: str = Field(description="Label of the token.", examples=["dativo"])
    pin: str = Field(
        description=(
            "The user PIN, always a `${ENV_VAR}` reference expanded by the supervisor; never "
            "written in the job file."
        ),
        examples=["${HSM_PIN}"],
        json_schema_extra={"pattern": r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$"},
    )

    @field_validator("pin", mode="before")
    @classmethod
    def _check_pin(cls, value: object) -> object:
        if isinstance(value, str) and _ENV_REF.fullmatch(value):
            return value
        raise Problem(
            "the PIN must be an environment variable reference such as `${HSM_PIN}`; set the "
            "variable for `dativo run`",
            show_input=False,
        )


#: Any key service spec.
KeyServiceSpec = Annotated[
    FileKeyService | KmsKeyService | Pkcs11KeyService, Field(discriminator="type")
]


class EncryptionSpec(_Model):
    """Client-side Parquet modular encryption (AES-256-GCM) of everything the writer stages."""

    key_service: KeyServiceSpec = Field(
        description=(
            "Where the master keys live: `{type: file, path}`, `{type: kms, region, "
            "endpoint_url}` or `{type: pkcs11, module, token, pin}`. Only the supervisor "
            "talks to it; the writer never sees a master key, credential or PIN."
        )
    )
    footer_key: _KeyId = Field(
        description=(
            "Master key id that protects each file's footer (schema, row counts, statistics) "
            "and every column not listed in `column_keys`."
        ),
        examples=["data"],
    )
    column_keys: dict[_KeyId, tuple[str, ...]] = Field(
        default_factory=dict,
        description=(
            "Sensitive columns with master keys of their own: key id -> top-level column "
            "names. A reader needs that key (besides the footer key) to read those columns."
        ),
        examples=[{"pii": ["email", "ssn"]}],
    )

    @field_validator("column_keys")
    @classmethod
    def _check_columns(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        seen: dict[str, str] = {}
        for key_id, columns in value.items():
            if not columns:
                raise Problem(f"key `{key_id}` lists no column; list at least one or remove it")
            for column in columns:
                if not column.strip():
                    raise Problem("column names cannot be empty", show_input=False)
                if column in seen:
                    raise Problem(
                        f"column `{column}` is listed under `{seen[column]}` and `{key_id}`; a "
                        "column has one key",
                        show_input=False,
                    )
                seen[column] = key_id
        return value

    def key_ids(self) -> tuple[str, ...]:
        """Every master key id the job uses, the footer key first."""
        return (self.footer_key, *(k for k in self.column_keys if k != self.footer_key))


class TargetSpec(_Model):
    """Where data goes."""

    format: Literal["parquet", "iceberg"] = Field(
        default="parquet",
        description=(
            "`parquet`: the staged files are published as they are into `target.path`; "
            "`iceberg`: the supervisor commits them to the table described by "
            "`target.iceberg`."
        ),
    )
    path: _Location | None = Field(
        default=None,
        description=(
            "With `format: parquet`: where the supervisor publishes the files the writer "
            "staged, once the run succeeds: a local directory (relative to the job file's "
            "directory) or `s3://bucket/prefix` (uploaded by the supervisor; credentials from "
            "the usual AWS sources)."
        ),
        examples=["./warehouse/orders", "s3://lake/orders"],
    )
    iceberg: IcebergSpec | None = Field(
        default=None,
        description="With `format: iceberg`: the catalog, warehouse, table, mode and partitions.",
    )
    writer: WriterSpec = Field(description=f"The writer plugin. {_PLUGIN_DESCRIPTION}")
    encryption: EncryptionSpec | None = Field(
        default=None,
        description=(
            "Encrypt the staged Parquet files (Parquet modular encryption, AES-256-GCM, "
            "per-file data keys wrapped by master keys of a key service), verify and audit "
            "them before publishing. Needs `format: parquet` and the built-in `parquet` writer. "
            "See docs/encryption.md."
        ),
    )

    @model_validator(mode="after")
    def _check_encryption(self) -> TargetSpec:
        if self.encryption is None:
            writer = self.writer
            if isinstance(writer.config, dict) and "encryption" in writer.config:
                raise Problem(
                    "`writer.config.encryption` is set by the supervisor; configure encryption "
                    "in `target.encryption` instead",
                    show_input=False,
                )
            return self
        if self.format != "parquet":
            raise Problem(
                "`encryption` works with `format: parquet` only (a local directory or an S3 "
                "prefix)",
                show_input=False,
            )
        writer = self.writer
        if not (isinstance(writer, BuiltinPlugin) and writer.name == "parquet"):
            raise Problem(
                "`encryption` needs the built-in `parquet` writer (`writer: {type: builtin, "
                "name: parquet}`)",
                show_input=False,
            )
        if "encryption" in writer.config:
            raise Problem(
                "`writer.config.encryption` is set by the supervisor from `target.encryption`; "
                "remove it",
                show_input=False,
            )
        if writer.config.get("partition_by"):
            raise Problem(
                "an encrypted target cannot be partitioned (`writer.config.partition_by`): "
                "partition values would be written in plain text in directory names",
                show_input=False,
            )
        return self

    @model_validator(mode="after")
    def _check_format(self) -> TargetSpec:
        if self.format == "iceberg":
            if self.iceberg is None:
                raise Problem(
                    "`format: iceberg` needs an `iceberg` block, such as `iceberg: {table: "
                    "orders}`",
                    show_input=False,
                )
            if self.path is not None:
                raise Problem(
                    "`path` is for `format: parquet`; an Iceberg table keeps its files where "
                    "`iceberg.warehouse` says",
                    show_input=False,
                )
            writer = self.writer
            if (
                isinstance(writer, BuiltinPlugin)
                and writer.name == "parquet"
                and writer.config.get("partition_by")
            ):
                raise Problem(
                    "with `format: iceberg` the writer must not partition "
                    "(`writer.config.partition_by`): Iceberg tables are partitioned by "
                    "`iceberg.partition_by`",
                    show_input=False,
                )
        elif self.iceberg is not None:
            raise Problem("an `iceberg` block needs `format: iceberg`", show_input=False)
        return self


class StateSpec(_Model):
    """Where the incremental state of the job is kept."""

    path: _HostPath = Field(
        default=Path(".dativo/state.db"),
        description="File of the state store. Relative to the job file's directory.",
    )


class RunSpec(_Model):
    """How the supervisor drives a run."""

    batch_size: Annotated[int, _Bounded("int", 1, 10_000_000, "rows")] = Field(
        default=65536, description="Rows per batch the reader is asked for, 1 to 10,000,000."
    )
    max_frame_bytes: Annotated[int, _Bounded("size", 1 * MiB, 2 * GiB)] = Field(
        default=128 * MiB,
        json_schema_extra={"default": "128MiB"},
        description=(
            "Largest protocol frame accepted from a plugin, 1MiB to 2GiB; a bigger frame fails "
            "the run. A size such as `128MiB`."
        ),
    )
    handshake_timeout: Annotated[float, _Bounded("duration", 1, 600)] = Field(
        default=30.0,
        json_schema_extra={"default": "30s"},
        description=(
            "How long a plugin may take to connect and say hello, 1s to 10m. A duration such "
            "as `30s`."
        ),
    )
    idle_timeout: Annotated[float, _Bounded("duration", 1, 7 * 86400)] = Field(
        default=300.0,
        json_schema_extra={"default": "5m"},
        description=(
            "Longest time the reader may send nothing at all (no batch, log or checkpoint) "
            "while the supervisor waits for it, 1s to 7d; a reader that hangs fails the run "
            "then, long before its wall-clock limit. Time spent blocked because the writer is "
            "slow does not count. A duration such as `5m`."
        ),
        examples=["30s", "1h"],
    )
    max_rows: Annotated[int, _Bounded("int", 1, 10**15, "rows")] | None = Field(
        default=None,
        description=(
            "Most rows the reader may send in one run; one more fails the run and publishes "
            "nothing. Default: no limit (the wall-clock limits still apply)."
        ),
        examples=[100_000_000],
    )
    max_bytes: Annotated[int, _Bounded("size", 1, 2**50)] | None = Field(
        default=None,
        description=(
            "Most Arrow IPC bytes the reader may send in one run (record batch frames as "
            "received); more fails the run and publishes nothing. Default: no limit. A size "
            "such as `50GiB`."
        ),
        examples=["50GiB"],
    )


class JobConfig(_Model):
    """A Dativo job file: read with one plugin, write with another, in sandboxes."""

    model_config = ConfigDict(title="Dativo job file")

    version: Literal[1] = Field(description="Version of the job file format; must be `1`.")
    name: str = Field(
        description=(
            "Name of the job: 1 to 63 lowercase letters, digits, `_` or `-`, starting with a "
            "letter or digit."
        ),
        examples=["orders-daily"],
        json_schema_extra={"pattern": r"^[a-z0-9][a-z0-9_-]{0,62}$"},
    )
    source: SourceSpec = Field(description="Where data comes from, and the reader plugin.")
    target: TargetSpec = Field(description="Where data goes, and the writer plugin.")
    state: StateSpec = Field(
        default_factory=StateSpec, description="Where incremental state is kept."
    )
    run: RunSpec = Field(default_factory=RunSpec, description="Settings of the run itself.")

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _job_path: Path | None = PrivateAttr(default=None)

    @field_validator("version", mode="before")
    @classmethod
    def _check_version(cls, value: object) -> object:
        if isinstance(value, int) and not isinstance(value, bool):
            if value == 1:
                return value
            raise Problem(
                "unsupported job file version; this Dativo reads version `1` only "
                "(write `version: 1`)"
            )
        raise Problem(
            "expected the number `1` (write `version: 1`), the only job file version this "
            "Dativo reads"
        )

    @field_validator("name", mode="before")
    @classmethod
    def _check_name(cls, value: object) -> object:
        if isinstance(value, str) and _NAME_RE.fullmatch(value):
            return value
        lower = (
            " (names are lowercase)" if isinstance(value, str) and value != value.lower() else ""
        )
        raise Problem(
            "expected 1 to 63 lowercase letters, digits, `_` or `-`, starting with a letter or "
            f"digit, such as `orders-daily`{lower}"
        )

    @property
    def job_path(self) -> Path | None:
        """Absolute path of the job file, or None when the job was built from a mapping."""
        return self._job_path

    @property
    def base_dir(self) -> Path:
        """Directory relative paths are resolved against: the job file's, else the cwd."""
        return self._base_dir

    def _resolve(self, path: Path) -> Path:
        return (self._base_dir / path.expanduser()).resolve()

    def resolve_path(self, path: Path) -> Path:
        """`path` made absolute against the job file's directory."""
        return self._resolve(path)

    @property
    def source_files_dir(self) -> Path | None:
        """Absolute host directory mounted for the reader, if the job grants one."""
        return None if self.source.files is None else self._resolve(self.source.files)

    @property
    def target_dir(self) -> Path | None:
        """Absolute host directory the writer's files are published into, if any (a local
        `format: parquet` target; None for S3 and Iceberg targets)."""
        path = self.target.path
        if path is None or self.target_url is not None:
            return None
        return self._resolve(Path(path))

    @property
    def target_url(self) -> str | None:
        """The `s3://bucket/prefix` a `format: parquet` target publishes to, if it is on S3."""
        path = self.target.path
        return path if path is not None and path.startswith("s3://") else None

    @property
    def staging_base(self) -> Path | None:
        """Local directory whose `.dativo-staging/` holds the writer's staging directories and
        the publish journals; None when the writer gets no staging directory.

        A local Parquet target stages inside itself (a rename publishes a file); S3 and
        Iceberg targets stage in `<job dir>/.dativo/staging/<job name>`.
        """
        if self.target_dir is not None:
            return self.target_dir
        if self.target_url is not None or self.target.format == "iceberg":
            return self._resolve(Path(".dativo") / "staging" / self.name)
        return None

    @property
    def iceberg_warehouse(self) -> str:
        """The Iceberg warehouse: `s3://...`, or the absolute local directory."""
        spec = self.target.iceberg
        location = spec.warehouse if spec is not None else None
        if location is not None and location.startswith("s3://"):
            return location
        return str(self._resolve(Path(location or "warehouse")))

    @property
    def iceberg_catalog_uri(self) -> str | None:
        """The catalog URI as written (`${VAR}` references unexpanded); the SQLite default
        for an `sql` catalog that names none."""
        spec = self.target.iceberg
        if spec is None:
            return None
        if spec.catalog.uri is None and spec.catalog.type == "sql":
            return f"sqlite:///{self._resolve(Path('.dativo') / 'catalog.db')}"
        return spec.catalog.uri

    @property
    def iceberg_table(self) -> tuple[str, str] | None:
        """(namespace, table) of an Iceberg target."""
        spec = self.target.iceberg
        if spec is None:
            return None
        return spec.namespace, spec.table or self.name.replace("-", "_")

    @property
    def state_path(self) -> Path:
        """Absolute path of the state store file."""
        return self._resolve(self.state.path)

    def python_plugin_dir(self, spec: PluginSpec) -> Path | None:
        """Absolute host directory of a `python` plugin's code, or None if it names none."""
        if isinstance(spec, PythonPlugin) and spec.path is not None:
            return self._resolve(spec.path)
        return None
