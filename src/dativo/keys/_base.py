"""The key service interface and its error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from dativo.errors import DativoError

__all__ = ["KeyService", "KeyServiceError", "KeyVersion", "Reason"]

#: Why a key operation failed, for reports and tests.
Reason = Literal["missing", "revoked", "wrong-key", "unavailable", "config", "malformed", "refused"]


class KeyServiceError(DativoError):
    """A key service refused or could not do what was asked; never holds key material.

    Attributes:
        service: `file`, `kms` or `pkcs11`.
        key_id: the master key concerned, when one is.
        reason: `missing`, `revoked`, `wrong-key`, `unavailable`, `config`, `malformed` or
            `refused`.
    """

    def __init__(
        self,
        message: str,
        *,
        service: str,
        reason: Reason,
        key_id: str | None = None,
        transient: bool | None = None,
    ) -> None:
        prefix = f"key service `{service}`"
        if key_id is not None:
            prefix += f", key `{key_id}`"
        super().__init__(
            f"{prefix}: {message}",
            transient=reason == "unavailable" if transient is None else transient,
        )
        self.service = service
        self.reason = reason
        self.key_id = key_id


@dataclass(frozen=True)
class KeyVersion:
    """A master key's current version, as the service names it."""

    key_id: str
    version: str


class KeyService(Protocol):
    """Master keys that wrap and unwrap data keys; one implementation per kind of service."""

    #: `file`, `kms` or `pkcs11`; embedded in every wrapped key.
    name: str

    def check(self, key_id: str) -> KeyVersion:
        """The current version of `key_id`, after checking it may wrap (exists, not revoked,
        service reachable).

        Raises:
            KeyServiceError: it may not.
        """
        ...

    def wrap(self, key_id: str, plaintext: bytes) -> str:
        """Encrypt `plaintext` (a data key) under the current version of `key_id`.

        Returns:
            An opaque string naming the service, the key id and the version.

        Raises:
            KeyServiceError: the key is missing, revoked, or the service is unreachable.
        """
        ...

    def unwrap(self, wrapped: str) -> bytes:
        """The data key `wrapped` holds, under the key version it names.

        Raises:
            KeyServiceError: wrong key, tampered, missing, revoked, or unreachable.
        """
        ...

    def describe(self) -> dict[str, Any]:
        """What the service is (kind, location), for reports; never a credential."""
        ...

    def close(self) -> None:
        """Release sessions and clients."""
        ...


class EncryptedFileError(DativoError):
    """An encrypted Parquet file failed a check: not encrypted, modified, or keyed otherwise
    than the job says. Never holds a data value or key material.

    Attributes:
        path: the file, as shown to the user.
        check: `authentication`, `not-encrypted`, `plaintext-column`, `key-mismatch`,
            `rows` or `unreadable`.
    """

    def __init__(self, message: str, *, path: str, check: str) -> None:
        super().__init__(message, transient=False)
        self.path = path
        self.check = check
