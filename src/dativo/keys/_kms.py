"""Master keys in AWS KMS (or a KMS-compatible server), through boto3.

A data key is wrapped with `Encrypt` under a KMS key id, ARN or alias, with an encryption
context naming the key id, and unwrapped with `Decrypt` under the exact key that wrapped it.
The *version* recorded with a wrapped key is the ARN of the KMS key that `Encrypt` used: rotate
by pointing the alias at a new key (`UpdateAlias`), and files written before keep unwrapping
with the old key as long as it stays enabled. KMS's own automatic rotation of a key's backing
material needs nothing from Dativo.

Credentials come from the usual AWS chain (environment, profile, instance role) and stay in the
supervisor; the endpoint from the job (`endpoint_url`), else `AWS_ENDPOINT_URL_KMS` or
`AWS_ENDPOINT_URL`.
"""

from __future__ import annotations

import os
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from dativo.keys._base import KeyServiceError, KeyVersion, Reason
from dativo.keys._wrapped import format_wrapped, parse_wrapped

__all__ = ["KmsKeys"]

_NAME = "kms"
_CONTEXT_KEY = "dativo-key-id"
_REASONS: dict[str, Reason] = {
    "NotFoundException": "missing",
    "DisabledException": "revoked",
    "KMSInvalidStateException": "revoked",
    "InvalidCiphertextException": "wrong-key",
    "IncorrectKeyException": "wrong-key",
    "InvalidKeyUsageException": "refused",
    "AccessDeniedException": "refused",
    "UnrecognizedClientException": "refused",
    "InvalidSignatureException": "refused",
    "KMSInternalException": "unavailable",
    "DependencyTimeoutException": "unavailable",
    "ThrottlingException": "unavailable",
}


class KmsKeys:
    """The `kms` key service; see the module docstring."""

    name = _NAME

    def __init__(self, *, region: str | None = None, endpoint_url: str | None = None) -> None:
        env = os.environ
        self.region = (
            region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
        )
        self.endpoint_url = (
            endpoint_url or env.get("AWS_ENDPOINT_URL_KMS") or env.get("AWS_ENDPOINT_URL")
        )
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            config = botocore.config.Config(
                connect_timeout=3, read_timeout=10, retries={"max_attempts": 2, "mode": "standard"}
            )
            self._client = boto3.session.Session().client(
                "kms", region_name=self.region, endpoint_url=self.endpoint_url, config=config
            )
        return self._client

    def describe(self) -> dict[str, Any]:
        where = self.endpoint_url or f"AWS KMS {self.region}"
        return {"service": _NAME, "region": self.region, "endpoint": where}

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None

    def _call(self, what: str, key_id: str, call: Any, **kwargs: Any) -> Any:
        where = self.endpoint_url or f"AWS KMS in {self.region}"
        try:
            return call(**kwargs)
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", "Unknown"))
            reason = _REASONS.get(code, "refused")
            text = {
                "missing": "does not exist (or is not visible with these credentials)",
                "revoked": "is disabled or pending deletion; it wraps and unwraps nothing",
                "wrong-key": "does not unwrap this data key: the key is wrong or the wrapped "
                "key was modified",
                "unavailable": "the service failed; try again",
            }.get(reason, "the request was refused")
            raise KeyServiceError(
                f"{what} failed at {where}: {text} ({code})",
                service=_NAME,
                reason=reason,
                key_id=key_id,
            ) from None
        except (
            botocore.exceptions.EndpointConnectionError,
            botocore.exceptions.ConnectTimeoutError,
            botocore.exceptions.ReadTimeoutError,
            botocore.exceptions.ConnectionClosedError,
        ) as exc:
            raise KeyServiceError(
                f"{what} failed: the service at {where} cannot be reached ({type(exc).__name__})",
                service=_NAME,
                reason="unavailable",
                key_id=key_id,
            ) from None
        except botocore.exceptions.NoCredentialsError:
            raise KeyServiceError(
                f"{what} failed: no AWS credentials found (environment, profile or instance "
                "role) for the supervisor",
                service=_NAME,
                reason="config",
                key_id=key_id,
            ) from None

    def check(self, key_id: str) -> KeyVersion:
        return KeyVersion(key_id, str(self._usable(key_id, key_id)["Arn"]))

    def _usable(self, key_id: str, lookup: str) -> dict[str, Any]:
        """The key's metadata, after checking it is enabled for encryption."""
        meta = self._call("DescribeKey", key_id, self.client.describe_key, KeyId=lookup)
        info: dict[str, Any] = meta["KeyMetadata"]
        if info.get("KeyState") != "Enabled" or not info.get("Enabled", True):
            raise KeyServiceError(
                f"is {info.get('KeyState', 'not enabled')}; it wraps nothing",
                service=_NAME,
                reason="revoked",
                key_id=key_id,
            )
        if info.get("KeyUsage", "ENCRYPT_DECRYPT") != "ENCRYPT_DECRYPT":
            raise KeyServiceError(
                f"has usage `{info.get('KeyUsage')}`; a symmetric ENCRYPT_DECRYPT key is needed",
                service=_NAME,
                reason="refused",
                key_id=key_id,
            )
        return info

    def wrap(self, key_id: str, plaintext: bytes) -> str:
        answer = self._call(
            "Encrypt",
            key_id,
            self.client.encrypt,
            KeyId=key_id,
            Plaintext=plaintext,
            EncryptionContext={_CONTEXT_KEY: key_id},
        )
        return format_wrapped(_NAME, key_id, str(answer["KeyId"]), bytes(answer["CiphertextBlob"]))

    def unwrap(self, wrapped: str) -> bytes:
        parsed = parse_wrapped(wrapped, service=_NAME)
        # The key's state is checked explicitly (fail closed): a disabled or deleted key
        # unwraps nothing, whatever a KMS-compatible server's Decrypt would do.
        self._usable(parsed.key_id, parsed.version)
        answer = self._call(
            "Decrypt",
            parsed.key_id,
            self.client.decrypt,
            KeyId=parsed.version,
            CiphertextBlob=parsed.ciphertext,
            EncryptionContext={_CONTEXT_KEY: parsed.key_id},
        )
        return bytes(answer["Plaintext"])
