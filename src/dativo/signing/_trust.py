"""The trust store (publisher keys), the trust policy, and the highest versions seen."""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import os
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dativo.errors import ConfigError
from dativo.signing._keys import KEY_ID_RE, PUBLISHER_RE, PublicKey, load_public_key
from dativo.signing._manifest import (
    _NAME_RE,
    ManifestError,
    Version,
    describe_validation_error,
    loads_strict,
)

try:  # libyaml's parser when present: the policy is parsed before every run
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # pragma: no cover
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]

__all__ = [
    "HOME_ENV",
    "Policy",
    "Publisher",
    "TrustStore",
    "add_trusted_key",
    "dativo_home",
    "load_trust",
    "record_seen",
    "revoke_key",
]

HOME_ENV = "DATIVO_HOME"
_MAX_FILE = 1 << 20
_PATTERN_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789._-/*?[]!")

POLICY_HEADER = """\
# Dativo trust policy (see docs/air-gapped.md). Edited by `dativo trust add|revoke`, which
# rewrite this file (comments other than this header are not kept).
#
# publishers: who may sign which plugins (`plugins` are glob patterns of manifest names)
# revoked_keys: key ids whose signatures are refused whatever else says
# allow_unsigned_local: DANGER when true: images built on this machine with no valid
#   signature, and `type: python` plugins, may run (each run is loudly labelled UNSIGNED)
"""


def dativo_home() -> Path:
    """`$DATIVO_HOME`, else `$XDG_DATA_HOME/dativo`, else `~/.local/share/dativo`."""
    explicit = os.environ.get(HOME_ENV)
    if explicit:
        return Path(explicit).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "dativo"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_key_ids(values: list[str]) -> list[str]:
    for value in values:
        if not isinstance(value, str) or not KEY_ID_RE.fullmatch(value):
            raise ValueError(f"`{str(value)[:40]}` is not a key id (16 lowercase hex digits)")
    if len(set(values)) != len(values):
        raise ValueError("a key id is listed twice")
    return values


class Publisher(_Model):
    """A publisher: its keys, and the plugin names they may sign."""

    name: str = Field(description="The publisher's name, such as `acme`.")
    keys: list[str] = Field(min_length=1, description="Key ids of the publisher.")
    plugins: list[str] = Field(
        min_length=1, description="Glob patterns of manifest names, such as `acme/*`."
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not PUBLISHER_RE.fullmatch(value):
            raise ValueError("expected lowercase letters, digits, `.`, `_` or `-`")
        return value

    @field_validator("keys")
    @classmethod
    def _check_keys(cls, value: list[str]) -> list[str]:
        return _check_key_ids(value)

    @field_validator("plugins")
    @classmethod
    def _check_plugins(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not pattern or not set(pattern) <= _PATTERN_CHARS or "/" not in pattern:
                raise ValueError(
                    f"`{pattern[:60]}` is not a pattern of plugin names such as `acme/*` or "
                    "`acme/pg-reader`"
                )
        return value

    def may_sign(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.plugins)


class Policy(_Model):
    """`trust/policy.yaml`."""

    version: Literal[1] = Field(description="Version of the policy format; `1`.")
    publishers: list[Publisher] = Field(default_factory=list)
    revoked_keys: list[str] = Field(default_factory=list)
    allow_unsigned_local: bool = Field(
        default=False,
        description="DANGER: let unsigned locally built images and `type: python` code run.",
    )

    @field_validator("revoked_keys")
    @classmethod
    def _check_revoked(cls, value: list[str]) -> list[str]:
        return _check_key_ids(value)

    @field_validator("publishers")
    @classmethod
    def _check_publishers(cls, value: list[Publisher]) -> list[Publisher]:
        names = [p.name for p in value]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"the publisher `{name}` appears twice")
        owners: dict[str, str] = {}
        for publisher in value:
            for key in publisher.keys:
                if key in owners:
                    raise ValueError(
                        f"key `{key}` belongs to both `{owners[key]}` and `{publisher.name}`; "
                        "a key has one publisher"
                    )
                owners[key] = publisher.name
        return value

    def publisher_of(self, key_id: str) -> Publisher | None:
        return next((p for p in self.publishers if key_id in p.keys), None)


class _UniqueKeyLoader(_SafeLoader):
    """A safe YAML loader that refuses a key given twice in one mapping."""

    def construct_mapping(
        self, node: yaml.MappingNode, deep: bool = False
    ) -> dict[typing.Hashable, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key `{key}` appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_small(path: Path) -> bytes:
    with path.open("rb") as handle:
        data = handle.read(_MAX_FILE + 1)
    if len(data) > _MAX_FILE:
        raise ConfigError(f"{path}: larger than 1 MiB", source=str(path))
    return data


def _load_policy(path: Path) -> Policy:
    if not path.is_file():
        raise ConfigError(
            f"no trust policy at `{path}`, so no plugin image can be verified. `make images` "
            "creates one trusting the local builder key; `dativo trust add KEY.pub.json "
            "--publisher NAME --plugins PATTERN` adds a publisher",
            source=str(path),
        )
    try:
        text = _read_small(path).decode("utf-8")
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError:
        raise
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ConfigError(f"{path}: not a readable YAML file: {detail}", source=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a trust policy is a mapping with `version: 1` and `publishers`",
            source=str(path),
        )
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        raise ConfigError(
            f"{path}: invalid trust policy: {describe_validation_error(exc)}",
            source=str(path),
            field=where,
        ) from None


@dataclass(frozen=True)
class TrustStore:
    """Everything verification trusts, loaded and validated at once from `$DATIVO_HOME`."""

    home: Path
    policy: Policy
    keys: dict[str, PublicKey] = field(default_factory=dict)
    seen: dict[str, str] = field(default_factory=dict)

    @property
    def policy_path(self) -> Path:
        return policy_path(self.home)

    @property
    def keys_dir(self) -> Path:
        return self.home / "trust" / "keys"

    @property
    def seen_path(self) -> Path:
        return self.home / "trust" / "seen.json"

    def signatures_dir(self, image_id: str) -> Path:
        return signatures_dir(self.home, image_id)


def policy_path(home: Path) -> Path:
    return home / "trust" / "policy.yaml"


def signatures_dir(home: Path, image_id: str) -> Path:
    return home / "signatures" / image_id.removeprefix("sha256:")


def _load_keys(directory: Path) -> dict[str, PublicKey]:
    keys: dict[str, PublicKey] = {}
    if not directory.is_dir():
        return keys
    for path in sorted(directory.iterdir()):
        if not path.name.endswith(".pub.json"):
            continue
        if path.is_symlink() or not path.is_file():
            raise ConfigError(f"{path}: not a regular file", source=str(path))
        key = load_public_key(path)
        if path.name != f"{key.key_id}.pub.json":
            raise ConfigError(
                f"{path}: holds key `{key.key_id}`; trusted keys are stored as "
                f"`<key id>.pub.json` (add keys with `dativo trust add`)",
                source=str(path),
            )
        keys[key.key_id] = key
    return keys


def _load_seen(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    try:
        data = loads_strict(_read_small(path))
    except (OSError, ManifestError) as exc:
        raise ConfigError(f"{path}: {exc}", source=str(path)) from None
    if not isinstance(data, dict) or data.get("version") != 1:
        raise ConfigError(f'{path}: expected `{{"version": 1, "plugins": {{...}}}}`')
    plugins = data.get("plugins")
    if not isinstance(plugins, dict):
        raise ConfigError(f"{path}: `plugins` must map plugin names to versions", source=str(path))
    for name, version in plugins.items():
        try:
            if not _NAME_RE.fullmatch(name):
                raise ValueError(f"`{name[:60]}` is not a plugin name")
            Version(str(version))
        except ValueError as exc:
            raise ConfigError(f"{path}: `plugins.{name[:60]}`: {exc}", source=str(path)) from None
    return {str(k): str(v) for k, v in plugins.items()}


def load_trust(home: Path | None = None) -> TrustStore:
    """Load and validate the trust store, the policy and the versions seen; fail on any flaw.

    Raises:
        ConfigError: a file is missing or malformed; the message names it and the field.
    """
    home = home or dativo_home()
    policy = _load_policy(policy_path(home))
    keys = _load_keys(home / "trust" / "keys")
    for publisher in policy.publishers:
        for key_id in publisher.keys:
            if key_id not in keys:
                raise ConfigError(
                    f"{policy_path(home)}: publisher `{publisher.name}` lists key `{key_id}`, "
                    f"which is not in the trust store `{home / 'trust' / 'keys'}`; add it with "
                    "`dativo trust add`",
                    source=str(policy_path(home)),
                    field="publishers",
                )
    seen = _load_seen(home / "trust" / "seen.json")
    return TrustStore(home=home, policy=policy, keys=keys, seen=seen)


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """One writer of the trust directory at a time."""
    trust = home / "trust"
    trust.mkdir(parents=True, exist_ok=True, mode=0o700)
    with (trust / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def _save_policy(path: Path, policy: Policy) -> None:
    body = yaml.safe_dump(policy.model_dump(mode="json"), sort_keys=False)
    _write_atomic(path, (POLICY_HEADER + body).encode())


def _current_policy(home: Path) -> Policy:
    path = policy_path(home)
    return _load_policy(path) if path.exists() else Policy(version=1)


def add_trusted_key(
    public: PublicKey, *, publisher: str | None, plugins: list[str], home: Path | None = None
) -> list[str]:
    """Trust `public` for `publisher` to sign `plugins`; idempotent. Returns what changed.

    Raises:
        ConfigError: the policy is malformed, the key is revoked, or belongs to another
            publisher.
    """
    home = home or dativo_home()
    name = publisher or public.publisher
    changes: list[str] = []
    with _locked(home):
        policy = _current_policy(home)
        if public.key_id in policy.revoked_keys:
            raise ConfigError(
                f"key `{public.key_id}` is revoked in {policy_path(home)}; a revoked key is "
                "never trusted again (generate a new key)"
            )
        owner = policy.publisher_of(public.key_id)
        if owner is not None and owner.name != name:
            raise ConfigError(
                f"key `{public.key_id}` already belongs to publisher `{owner.name}`, not `{name}`"
            )
        keys_dir = home / "trust" / "keys"
        keys_dir.mkdir(parents=True, exist_ok=True)
        stored = keys_dir / f"{public.key_id}.pub.json"
        if not stored.exists() or load_public_key(stored).raw != public.raw:
            _write_atomic(stored, public.to_bytes())
            changes.append(f"stored key `{public.key_id}` in {stored}")
        publishers = list(policy.publishers)
        index = next((i for i, p in enumerate(publishers) if p.name == name), None)
        if index is None:
            entry = Publisher(name=name, keys=[public.key_id], plugins=list(dict.fromkeys(plugins)))
            publishers.append(entry)
            changes.append(f"added publisher `{name}` signing {', '.join(entry.plugins)}")
        else:
            old = publishers[index]
            keys = old.keys + [public.key_id] * (public.key_id not in old.keys)
            patterns = old.plugins + [p for p in dict.fromkeys(plugins) if p not in old.plugins]
            if keys != old.keys:
                changes.append(f"added key `{public.key_id}` to publisher `{name}`")
            if patterns != old.plugins:
                changes.append(f"publisher `{name}` may now sign {', '.join(patterns)}")
            publishers[index] = Publisher(name=name, keys=keys, plugins=patterns)
        try:
            updated = Policy(
                version=1,
                publishers=publishers,
                revoked_keys=policy.revoked_keys,
                allow_unsigned_local=policy.allow_unsigned_local,
            )
        except ValidationError as exc:
            raise ConfigError(f"cannot add the key: {describe_validation_error(exc)}") from None
        if updated != policy or not policy_path(home).exists():
            _save_policy(policy_path(home), updated)
    return changes


def revoke_key(key_id: str, *, home: Path | None = None) -> bool:
    """Add `key_id` to the policy's revoked keys; False if it already was."""
    if not KEY_ID_RE.fullmatch(key_id):
        raise ConfigError(f"`{key_id[:40]}` is not a key id (16 lowercase hex digits)")
    home = home or dativo_home()
    with _locked(home):
        policy = _current_policy(home)
        if key_id in policy.revoked_keys:
            return False
        updated = policy.model_copy(update={"revoked_keys": [*policy.revoked_keys, key_id]})
        _save_policy(policy_path(home), updated)
    return True


def set_allow_unsigned_local(allow: bool, *, home: Path | None = None) -> None:
    """Switch `allow_unsigned_local` in the policy (creating an empty policy if needed)."""
    home = home or dativo_home()
    with _locked(home):
        policy = _current_policy(home)
        updated = policy.model_copy(update={"allow_unsigned_local": allow})
        _save_policy(policy_path(home), updated)


def record_seen(name: str, version: str, *, home: Path | None = None) -> bool:
    """Remember `version` of `name` if it is the highest yet (rollback protection)."""
    home = home or dativo_home()
    path = home / "trust" / "seen.json"
    with _locked(home):
        seen = _load_seen(path)
        current = seen.get(name)
        if current is not None and Version(current) >= Version(version):
            return False
        seen[name] = version
        text = json.dumps({"version": 1, "plugins": dict(sorted(seen.items()))}, indent=2)
        _write_atomic(path, text.encode() + b"\n")
    return True
