"""Ed25519 publisher keys: generation, the public key file, loading a private key."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dativo.errors import ConfigError
from dativo.signing._manifest import ManifestError, canonical_json, loads_strict

__all__ = [
    "KEY_ID_RE",
    "PrivateKey",
    "PublicKey",
    "generate_key",
    "key_id_of",
    "load_private_key",
    "load_public_key",
    "parse_time",
    "utc_now",
]

KEY_ID_RE = re.compile(r"[0-9a-f]{16}")
_KEY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
PUBLISHER_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_PUBLIC_FIELDS = {"key_id", "publisher", "public_key", "created_at", "expires_at", "algorithm"}
_MAX_KEY_FILE = 64 * 1024


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def format_time(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_time(value: object) -> dt.datetime:
    """An ISO 8601 time with a zone (`2026-01-31T12:00:00Z`), as an aware datetime."""
    if not isinstance(value, str):
        raise ValueError("expected an ISO 8601 time such as `2026-01-31T12:00:00Z`")
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"`{value[:40]}` is not an ISO 8601 time such as `2026-01-31T12:00:00Z`"
        ) from None
    if moment.tzinfo is None:
        raise ValueError(f"`{value[:40]}` has no time zone; add `Z` for UTC")
    return moment


def key_id_of(raw: bytes) -> str:
    """The first 16 hex digits of the SHA-256 of the raw 32-byte public key."""
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class PublicKey:
    """A publisher's Ed25519 public key, as kept in `NAME.pub.json` and the trust store."""

    key_id: str
    publisher: str
    raw: bytes
    created_at: dt.datetime
    expires_at: dt.datetime | None = None
    source: str = "<key>"

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True if `signature` is this key's Ed25519 signature of exactly `data`."""
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def expired(self, now: dt.datetime | None = None) -> bool:
        return self.expires_at is not None and (now or utc_now()) >= self.expires_at

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "algorithm": "ed25519",
            "key_id": self.key_id,
            "publisher": self.publisher,
            "public_key": base64.b64encode(self.raw).decode(),
            "created_at": format_time(self.created_at),
        }
        if self.expires_at is not None:
            data["expires_at"] = format_time(self.expires_at)
        return data

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json()) + b"\n"

    @classmethod
    def from_json(cls, data: object, source: str) -> PublicKey:
        """Validate a public key file's content.

        Raises:
            ConfigError: naming `source` and the bad field.
        """

        def fail(field: str, message: str) -> ConfigError:
            return ConfigError(f"{source}: `{field}`: {message}", source=source, field=field)

        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a public key file is a JSON object", source=source)
        unknown = sorted(set(data) - _PUBLIC_FIELDS)
        if unknown:
            raise fail(unknown[0], "unknown field")
        for name in ("key_id", "publisher", "public_key", "created_at"):
            if name not in data:
                raise fail(name, "missing; required")
        if data.get("algorithm", "ed25519") != "ed25519":
            raise fail("algorithm", "only `ed25519` is accepted")
        try:
            raw = base64.b64decode(str(data["public_key"]), validate=True)
        except (binascii.Error, ValueError):
            raise fail("public_key", "not base64") from None
        if len(raw) != 32:
            raise fail("public_key", f"an Ed25519 public key is 32 bytes, not {len(raw)}")
        key_id = data["key_id"]
        if key_id != key_id_of(raw):
            raise fail(
                "key_id",
                f"`{str(key_id)[:40]}` is not the key's id (`{key_id_of(raw)}`, the first 16 hex "
                "digits of the SHA-256 of the key); the file was edited",
            )
        publisher = data["publisher"]
        if not isinstance(publisher, str) or not PUBLISHER_RE.fullmatch(publisher):
            raise fail("publisher", "expected lowercase letters, digits, `.`, `_` or `-`")
        try:
            created = parse_time(data["created_at"])
        except ValueError as exc:
            raise fail("created_at", str(exc)) from None
        expires = None
        if data.get("expires_at") is not None:
            try:
                expires = parse_time(data["expires_at"])
            except ValueError as exc:
                raise fail("expires_at", str(exc)) from None
        return cls(key_id, publisher, raw, created, expires, source)


def load_public_key(path: Path) -> PublicKey:
    """Read and validate a `NAME.pub.json` file.

    Raises:
        ConfigError: the file is missing or malformed; the message names it and the field.
    """
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_KEY_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}", source=str(path)) from None
    if len(data) > _MAX_KEY_FILE:
        raise ConfigError(f"{path}: too large for a public key file", source=str(path))
    try:
        parsed = loads_strict(data)
    except ManifestError as exc:
        raise ConfigError(f"{path}: {exc}", source=str(path)) from None
    return PublicKey.from_json(parsed, str(path))


@dataclass(frozen=True)
class PrivateKey:
    """A publisher's Ed25519 private key, loaded for signing."""

    key: Ed25519PrivateKey
    public: PublicKey

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw
    )


def load_private_key(path: Path) -> PrivateKey:
    """Load `NAME.key` (PKCS8 PEM) and its `NAME.pub.json` next to it.

    Raises:
        ConfigError: unreadable, not an Ed25519 key, or not the pair of its public key file.
    """
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read the private key: {exc.strerror or exc}", source=str(path)
        ) from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{path}: not an unencrypted PKCS8 PEM private key ({exc})", source=str(path)
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 key; Dativo signs with Ed25519 only")
    raw = _raw_public(key)
    pub_path = path.with_name(path.name.removesuffix(".key") + ".pub.json")
    if pub_path.is_file():
        public = load_public_key(pub_path)
        if public.raw != raw:
            raise ConfigError(
                f"{pub_path} is not the public half of {path}; regenerate the pair",
                source=str(pub_path),
            )
    else:
        raise ConfigError(
            f"{path}: its public key file `{pub_path.name}` is missing next to it; it names "
            "the publisher and expiry, so signing needs it",
            source=str(path),
        )
    if public.expires_at is not None and public.expired():
        raise ConfigError(
            f"{path}: key `{public.key_id}` expired at {format_time(public.expires_at)}; "
            "generate a new one with `dativo keys generate`",
            source=str(path),
        )
    return PrivateKey(key, public)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def generate_key(
    name: str,
    out_dir: Path,
    *,
    publisher: str | None = None,
    expires_at: dt.datetime | None = None,
) -> tuple[Path, Path, PublicKey]:
    """Write a new Ed25519 key pair as `NAME.key` (mode 0600) and `NAME.pub.json`.

    Raises:
        ConfigError: a bad name or publisher, or either file exists already (never overwritten).
    """
    if not _KEY_NAME_RE.fullmatch(name):
        raise ConfigError(
            f"key name `{name[:70]}`: expected letters, digits, `.`, `_` or `-`, such as "
            "`acme-release`"
        )
    publisher = publisher or name.lower()
    if not PUBLISHER_RE.fullmatch(publisher):
        raise ConfigError(
            f"publisher `{publisher[:70]}`: expected lowercase letters, digits, `.`, `_` or `-`"
        )
    key_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub.json"
    for path in (key_path, pub_path):
        if path.exists() or path.is_symlink():
            raise ConfigError(
                f"{path} exists already; keys are never overwritten (choose another name or "
                "move the old pair away)",
                source=str(path),
            )
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    raw = _raw_public(key)
    now = utc_now().replace(microsecond=0)
    if expires_at is not None and expires_at <= now:
        raise ConfigError("the expiry must be in the future")
    public = PublicKey(key_id_of(raw), publisher, raw, now, expires_at, str(pub_path))
    pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    _write_new(key_path, pem, 0o600)
    _write_new(pub_path, public.to_bytes(), 0o644)
    return key_path, pub_path, public
