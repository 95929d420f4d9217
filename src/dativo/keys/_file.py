"""Master keys in a local JSON key file, for air-gapped sites.

The file maps key ids to numbered versions of 32-byte AES keys (base64), names the `current`
version of each (the one new data keys are wrapped with) and may list `revoked` versions
(which unwrap nothing any more)::

    {"version": 1,
     "keys": {"pii": {"current": 2, "versions": {"1": "<base64>", "2": "<base64>"},
                      "revoked": [1]}}}

A data key is wrapped with AES-256-GCM under the current version, with the key id and version
as associated data, so a wrapped key moved to another key id or version fails to unwrap. The
file must be readable by its owner only (mode 0600) and owned by the user running Dativo;
anything else is refused before a key is read.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dativo.keys._base import KeyServiceError, KeyVersion
from dativo.keys._wrapped import format_wrapped, parse_wrapped

__all__ = ["FileKeys", "create_key_file", "revoke_version", "rotate_key"]

_NAME = "file"
_NONCE = 12
_MAX_FILE = 1 << 20


def _aad(key_id: str, version: str) -> bytes:
    return f"dativo-file-key\x00{key_id}\x00{version}".encode()


class FileKeys:
    """The `file` key service; see the module docstring."""

    name = _NAME

    def __init__(self, path: Path) -> None:
        self.path = path
        self._keys = _load(path)

    def describe(self) -> dict[str, Any]:
        return {"service": _NAME, "path": str(self.path)}

    def close(self) -> None:
        self._keys = {}

    def _error(self, message: str, reason: Any, key_id: str | None = None) -> KeyServiceError:
        return KeyServiceError(
            f"{message} (key file `{self.path}`)", service=_NAME, reason=reason, key_id=key_id
        )

    def _entry(self, key_id: str) -> dict[str, Any]:
        entry = self._keys.get(key_id)
        if entry is None:
            known = ", ".join(f"`{k}`" for k in sorted(self._keys)) or "none"
            raise self._error(f"no such key; the file holds {known}", "missing", key_id)
        return entry

    def _key(self, key_id: str, version: str) -> bytes:
        entry = self._entry(key_id)
        if version in entry["revoked"]:
            raise self._error(
                f"version {version} is revoked; it unwraps nothing any more", "revoked", key_id
            )
        key = entry["versions"].get(version)
        if key is None:
            raise self._error(f"version {version} is not in the file", "missing", key_id)
        return key  # type: ignore[no-any-return]

    def check(self, key_id: str) -> KeyVersion:
        version = str(self._entry(key_id)["current"])
        self._key(key_id, version)
        return KeyVersion(key_id, version)

    def wrap(self, key_id: str, plaintext: bytes) -> str:
        version = self.check(key_id).version
        nonce = secrets.token_bytes(_NONCE)
        sealed = AESGCM(self._key(key_id, version)).encrypt(nonce, plaintext, _aad(key_id, version))
        return format_wrapped(_NAME, key_id, version, nonce + sealed)

    def unwrap(self, wrapped: str) -> bytes:
        parsed = parse_wrapped(wrapped, service=_NAME)
        key = self._key(parsed.key_id, parsed.version)
        blob = parsed.ciphertext
        try:
            return AESGCM(key).decrypt(
                blob[:_NONCE], blob[_NONCE:], _aad(parsed.key_id, parsed.version)
            )
        except (InvalidTag, ValueError):
            raise self._error(
                f"version {parsed.version} does not unwrap this data key: the key is wrong "
                "(another key file?) or the wrapped key was modified",
                "wrong-key",
                parsed.key_id,
            ) from None


def _refuse(path: Path, message: str, reason: Any = "config") -> KeyServiceError:
    return KeyServiceError(f"{message} (key file `{path}`)", service=_NAME, reason=reason)


def _load(path: Path) -> dict[str, dict[str, Any]]:
    """Read and check the key file; refuse one others could read or that someone else owns."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _refuse(path, "the key file does not exist", "missing") from None
    except OSError as exc:
        raise _refuse(path, f"cannot open the key file ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _refuse(path, "the key file is not a regular file")
        if info.st_uid != os.geteuid():
            raise _refuse(
                path,
                f"the key file is owned by uid {info.st_uid}, not by uid {os.geteuid()} who runs "
                f"Dativo; refusing it. Fix: `chown {os.geteuid()} {path}` (as its owner or root)",
            )
        if info.st_mode & 0o077:
            raise _refuse(
                path,
                f"the key file is readable or writable by group or others (mode "
                f"{stat.S_IMODE(info.st_mode):04o}); refusing it. Fix: `chmod 600 {path}`",
            )
        with os.fdopen(os.dup(fd), "rb") as handle:
            raw = handle.read(_MAX_FILE + 1)
    finally:
        os.close(fd)
    if len(raw) > _MAX_FILE:
        raise _refuse(path, "the key file is larger than 1 MiB")
    try:
        data = json.loads(raw)
        if data.get("version") != 1 or not isinstance(data.get("keys"), dict):
            raise ValueError("expected `version: 1` and a `keys` mapping")
        keys: dict[str, dict[str, Any]] = {}
        for key_id, entry in data["keys"].items():
            versions = {
                str(v): base64.b64decode(k, validate=True) for v, k in entry["versions"].items()
            }
            if any(len(k) != 32 for k in versions.values()):
                raise ValueError(f"key `{key_id}`: every version must be 32 bytes (AES-256)")
            current = str(entry["current"])
            if current not in versions:
                raise ValueError(f"key `{key_id}`: current version {current} is not listed")
            revoked = {str(v) for v in entry.get("revoked", [])}
            keys[str(key_id)] = {"current": current, "versions": versions, "revoked": revoked}
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        # The message names the structure only, never a key's bytes.
        problem = str(exc) if isinstance(exc, ValueError) and "key `" in str(exc) else ""
        raise _refuse(
            path, f"the key file is malformed{': ' + problem if problem else ''}", "malformed"
        ) from None
    return keys


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def _read_raw(path: Path) -> dict[str, Any]:
    _load(path)  # the same checks as for use
    return json.loads(path.read_bytes())  # type: ignore[no-any-return]


def create_key_file(path: Path, key_ids: list[str]) -> None:
    """Write a new key file (mode 0600) with version 1 of each key id; refuse to overwrite."""
    if path.exists():
        raise _refuse(path, "the key file exists already; use `rotate_key` to add a version")
    keys = {
        key_id: {
            "current": 1,
            "versions": {"1": base64.b64encode(secrets.token_bytes(32)).decode()},
            "revoked": [],
        }
        for key_id in key_ids
    }
    _write(path, {"version": 1, "keys": keys})


def rotate_key(path: Path, key_id: str) -> int:
    """Add a new version of `key_id` (a new one if absent) and make it current; return it."""
    data = _read_raw(path)
    entry = data["keys"].setdefault(key_id, {"current": 0, "versions": {}, "revoked": []})
    version = max((int(v) for v in entry["versions"]), default=0) + 1
    entry["versions"][str(version)] = base64.b64encode(secrets.token_bytes(32)).decode()
    entry["current"] = version
    _write(path, data)
    return version


def revoke_version(path: Path, key_id: str, version: int) -> None:
    """Mark one version of `key_id` revoked: it wraps and unwraps nothing any more."""
    data = _read_raw(path)
    entry = data["keys"][key_id]
    entry["revoked"] = sorted({*entry.get("revoked", []), version})
    _write(path, data)
