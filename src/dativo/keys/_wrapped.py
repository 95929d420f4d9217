"""The opaque string a wrapped data key travels as: `dativo-wk1.<base64url of JSON>`.

The JSON names the service, the master key id and its version, and holds the ciphertext, so
any later version of a rotated master key still finds the version that wrapped a key.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from dativo.keys._base import KeyServiceError

__all__ = ["PREFIX", "WrappedKey", "format_wrapped", "parse_wrapped"]

PREFIX = "dativo-wk1."
_MAX_WRAPPED = 8192


@dataclass(frozen=True)
class WrappedKey:
    """A data key wrapped by one version of a master key."""

    service: str
    key_id: str
    version: str
    ciphertext: bytes


def format_wrapped(service: str, key_id: str, version: str, ciphertext: bytes) -> str:
    """The opaque string of a wrapped key."""
    body = json.dumps(
        {
            "s": service,
            "k": key_id,
            "v": version,
            "c": base64.b64encode(ciphertext).decode(),
        },
        separators=(",", ":"),
        sort_keys=True,
    )
    return PREFIX + base64.urlsafe_b64encode(body.encode()).decode()


def parse_wrapped(text: str, *, service: str) -> WrappedKey:
    """Parse a wrapped key, refusing one that is malformed or made by another service.

    Raises:
        KeyServiceError: reason `malformed`, or `config` for another service's key.
    """

    def bad(what: str) -> KeyServiceError:
        return KeyServiceError(
            f"the wrapped key is malformed ({what})", service=service, reason="malformed"
        )

    if not isinstance(text, str) or len(text) > _MAX_WRAPPED or not text.startswith(PREFIX):
        raise bad("not a Dativo wrapped key")
    try:
        data = json.loads(base64.urlsafe_b64decode(text[len(PREFIX) :].encode()))
        ciphertext = base64.b64decode(data["c"], validate=True)
        wrapped = WrappedKey(str(data["s"]), str(data["k"]), str(data["v"]), ciphertext)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise bad("undecodable") from None
    if wrapped.service != service:
        raise KeyServiceError(
            f"the data key was wrapped by the `{wrapped.service}` key service (key "
            f"`{wrapped.key_id}`), not by this `{service}` one; use the job's original key "
            "service settings",
            service=service,
            reason="config",
            key_id=wrapped.key_id,
        )
    return wrapped
