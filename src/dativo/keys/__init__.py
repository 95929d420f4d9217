"""Key services behind one interface: master keys in AWS KMS, a local key file or a PKCS#11 HSM.

Only the supervisor (and the `dativo decrypt` tooling) use this package; a writer plugin never
sees a master key, a KMS credential or an HSM PIN. It asks the supervisor's key broker to
*wrap* the data keys it generates (`dativo.supervisor._keybroker`), and cannot unwrap anything.

Every service wraps a key under the *current version* of a named master key and returns an
opaque string (`dativo.keys._wrapped`) naming the service, the key id and that version, so a
rotated key keeps unwrapping what its older versions wrapped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dativo.keys._base import EncryptedFileError, KeyService, KeyServiceError, KeyVersion
from dativo.keys._wrapped import WrappedKey, format_wrapped, parse_wrapped

if TYPE_CHECKING:
    from dativo.config import JobConfig

__all__ = [
    "EncryptedFileError",
    "KeyService",
    "KeyServiceError",
    "KeyVersion",
    "WrappedKey",
    "format_wrapped",
    "key_service_for",
    "parse_wrapped",
]


def key_service_for(job: JobConfig) -> KeyService:
    """The key service `target.encryption.key_service` of `job` describes (not yet contacted).

    Raises:
        ConfigError: the job has no `target.encryption`.
        KeyServiceError: the service cannot be set up (an unsafe key file, a missing module).
    """
    from dativo.config import FileKeyService, KmsKeyService, Pkcs11KeyService
    from dativo.errors import ConfigError

    spec = job.target.encryption
    if spec is None:
        raise ConfigError(
            "the job has no `target.encryption`; add one to use a key service",
            field="target.encryption",
        )
    service = spec.key_service
    if isinstance(service, FileKeyService):
        from dativo.keys._file import FileKeys

        return FileKeys(job.resolve_path(service.path))
    if isinstance(service, KmsKeyService):
        from dativo.keys._kms import KmsKeys

        return KmsKeys(region=service.region, endpoint_url=service.endpoint_url)
    if isinstance(service, Pkcs11KeyService):
        from dativo.keys._pkcs11 import Pkcs11Keys

        return Pkcs11Keys(
            module=job.resolve_path(service.module), token=service.token, pin=service.pin
        )
    raise ConfigError(f"unknown key service `{service}`")  # pragma: no cover - closed union
