"""Master keys in a PKCS#11 HSM (tested with SoftHSM2), through python-pkcs11.

Each version of a master key is an AES-256 secret key object on the token labelled
`<key_id>.v<N>`; the highest N is the current version. A data key is wrapped *inside the HSM*
with AES-GCM (`CKM_AES_GCM`, a random 96-bit nonce, the key id and version as associated data),
so the master key never leaves the token. Revoke a version by removing its key object or by
turning its `CKA_DECRYPT` (and `CKA_ENCRYPT`) attribute off.

The PIN is a `${ENV_VAR}` reference in the job file, expanded in the supervisor only.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path
from typing import Any

import pkcs11
from pkcs11 import Attribute, GCMParams, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import NoSuchToken, PinIncorrect, PKCS11Error, UserAlreadyLoggedIn

from dativo.errors import ConfigError
from dativo.keys._base import KeyServiceError, KeyVersion, Reason
from dativo.keys._wrapped import format_wrapped, parse_wrapped

__all__ = ["Pkcs11Keys"]

_NAME = "pkcs11"
_NONCE = 12
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_VERSION_LABEL = re.compile(r"(.+)\.v([1-9][0-9]{0,8})")


def _aad(key_id: str, version: str) -> bytes:
    return f"dativo-pkcs11-key\x00{key_id}\x00{version}".encode()


def expand_pin(pin: str) -> str:
    """The PIN with its `${VAR}` reference expanded from the supervisor's environment."""

    def replace(match: re.Match[str]) -> str:
        name = match[1]
        if name not in os.environ:
            raise ConfigError(
                f"`target.encryption.key_service.pin` refers to the environment variable "
                f"`{name}`, which is not set; set it for the supervisor",
                field="target.encryption.key_service.pin",
            )
        return os.environ[name]

    return _ENV_REF.sub(replace, pin)


class Pkcs11Keys:
    """The `pkcs11` key service; see the module docstring."""

    name = _NAME

    def __init__(self, *, module: Path, token: str, pin: str) -> None:
        self.module = module
        self.token = token
        self._pin = expand_pin(pin)
        self._session: Any = None

    def describe(self) -> dict[str, Any]:
        return {"service": _NAME, "module": str(self.module), "token": self.token}

    def close(self) -> None:
        if self._session is not None:
            with contextlib.suppress(PKCS11Error):
                self._session.close()
        self._session = None

    def _error(self, message: str, reason: Reason, key_id: str | None = None) -> KeyServiceError:
        return KeyServiceError(
            f"{message} (token `{self.token}`, module `{self.module}`)",
            service=_NAME,
            reason=reason,
            key_id=key_id,
        )

    def _open(self) -> Any:
        if self._session is not None:
            return self._session
        if not self.module.is_file():
            raise self._error("the PKCS#11 module does not exist", "config")
        try:
            # One library instance per real file: PKCS#11 initialises a module once per process.
            library = pkcs11.lib(str(self.module.resolve()))
            token = library.get_token(token_label=self.token)
            try:
                self._session = token.open(user_pin=self._pin)
            except UserAlreadyLoggedIn:
                # PKCS#11 logins are per process: another session of ours logged in already.
                self._session = token.open()
        except NoSuchToken:
            raise self._error(
                "no such token: the HSM or its slot is not available", "unavailable"
            ) from None
        except PinIncorrect:
            raise self._error("the PIN was refused", "refused") from None
        except (PKCS11Error, OSError, RuntimeError) as exc:
            raise self._error(
                f"cannot open the token ({type(exc).__name__})", "unavailable"
            ) from None
        return self._session

    def _versions(self, key_id: str) -> dict[int, Any]:
        session = self._open()
        found: dict[int, Any] = {}
        try:
            for obj in session.get_objects(
                {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES}
            ):
                match = _VERSION_LABEL.fullmatch(str(obj.label))
                if match is not None and match[1] == key_id:
                    found[int(match[2])] = obj
        except PKCS11Error as exc:
            raise self._error(
                f"listing keys failed ({type(exc).__name__})", "unavailable", key_id
            ) from None
        return found

    def _key(self, key_id: str, version: int, usage: Attribute) -> Any:
        key = self._versions(key_id).get(version)
        if key is None:
            raise self._error(
                f"version {version} (label `{key_id}.v{version}`) is not on the token: removed, "
                "or never created",
                "missing",
                key_id,
            )
        if not key[usage]:
            raise self._error(
                f"version {version} has its `{usage.name}` attribute off: revoked",
                "revoked",
                key_id,
            )
        return key

    def check(self, key_id: str) -> KeyVersion:
        versions = self._versions(key_id)
        if not versions:
            raise self._error(
                f"no AES key labelled `{key_id}.v<N>` on the token", "missing", key_id
            )
        current = max(versions)
        self._key(key_id, current, Attribute.ENCRYPT)
        return KeyVersion(key_id, str(current))

    def wrap(self, key_id: str, plaintext: bytes) -> str:
        version = self.check(key_id).version
        key = self._key(key_id, int(version), Attribute.ENCRYPT)
        nonce = secrets.token_bytes(_NONCE)
        try:
            sealed = key.encrypt(
                plaintext,
                mechanism=Mechanism.AES_GCM,
                mechanism_param=GCMParams(nonce, _aad(key_id, version), 128),
            )
        except PKCS11Error as exc:
            raise self._error(
                f"wrapping failed ({type(exc).__name__})", "refused", key_id
            ) from None
        return format_wrapped(_NAME, key_id, version, nonce + bytes(sealed))

    def unwrap(self, wrapped: str) -> bytes:
        parsed = parse_wrapped(wrapped, service=_NAME)
        if not parsed.version.isdigit():
            raise self._error("the wrapped key names no version", "malformed", parsed.key_id)
        key = self._key(parsed.key_id, int(parsed.version), Attribute.DECRYPT)
        blob = parsed.ciphertext
        try:
            return bytes(
                key.decrypt(
                    blob[_NONCE:],
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(
                        blob[:_NONCE], _aad(parsed.key_id, parsed.version), 128
                    ),
                )
            )
        except PKCS11Error:
            raise self._error(
                f"version {parsed.version} does not unwrap this data key: the key is wrong or "
                "the wrapped key was modified",
                "wrong-key",
                parsed.key_id,
            ) from None
