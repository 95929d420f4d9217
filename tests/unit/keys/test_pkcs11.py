"""The `pkcs11` key service against a SoftHSM2 token: wrap inside the HSM, rotation,
revocation (usage attribute off, key removed), wrong PIN or token, tampering."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dativo.errors import ConfigError
from dativo.keys import KeyServiceError, format_wrapped, parse_wrapped
from dativo.keys._pkcs11 import Pkcs11Keys
from tests.unit.keys.conftest import PIN_ENV, SoftHsm


def keys(hsm: SoftHsm, **changes: str) -> Pkcs11Keys:
    settings = {"token": hsm.token, "pin": f"${{{PIN_ENV}}}", **changes}
    return Pkcs11Keys(module=hsm.module, token=settings["token"], pin=settings["pin"])


def test_wrap_unwrap_round_trip_inside_the_hsm(softhsm: SoftHsm) -> None:
    softhsm.add_key("roundtrip.v1")
    service = keys(softhsm)
    try:
        wrapped = service.wrap("roundtrip", b"d" * 32)
        parsed = parse_wrapped(wrapped, service="pkcs11")
        assert (parsed.key_id, parsed.version) == ("roundtrip", "1")
        assert service.unwrap(wrapped) == b"d" * 32
        assert service.describe()["token"] == softhsm.token
    finally:
        service.close()


def test_rotation_the_highest_version_wraps_and_old_ones_still_unwrap(softhsm: SoftHsm) -> None:
    softhsm.add_key("rotating.v1")
    service = keys(softhsm)
    old = service.wrap("rotating", b"o" * 32)
    softhsm.add_key("rotating.v2")
    new = service.wrap("rotating", b"n" * 32)
    assert parse_wrapped(new, service="pkcs11").version == "2"
    assert service.check("rotating").version == "2"
    assert service.unwrap(old) == b"o" * 32
    assert service.unwrap(new) == b"n" * 32
    service.close()


def test_a_key_with_its_usage_off_or_removed_is_revoked_or_missing(softhsm: SoftHsm) -> None:
    softhsm.add_key("revoking.v1")
    service = keys(softhsm)
    wrapped = service.wrap("revoking", b"r" * 32)
    softhsm.set_usage("revoking.v1", encrypt=False, decrypt=False)
    with pytest.raises(KeyServiceError, match="attribute off: revoked") as info:
        service.unwrap(wrapped)
    assert (info.value.reason, info.value.key_id) == ("revoked", "revoking")
    with pytest.raises(KeyServiceError, match="revoked"):
        service.wrap("revoking", b"r" * 32)
    softhsm.remove_key("revoking.v1")
    with pytest.raises(KeyServiceError, match="not on the token") as info:
        service.unwrap(wrapped)
    assert info.value.reason == "missing"
    with pytest.raises(KeyServiceError, match=r"no AES key labelled `revoking\.v<N>`"):
        service.check("revoking")
    service.close()


def test_a_tampered_or_foreign_wrapped_key_fails_authentication(softhsm: SoftHsm) -> None:
    softhsm.add_key("tamper.v1")
    softhsm.add_key("other.v1")
    service = keys(softhsm)
    parsed = parse_wrapped(service.wrap("tamper", b"t" * 32), service="pkcs11")
    flipped = bytearray(parsed.ciphertext)
    flipped[20] ^= 1
    with pytest.raises(KeyServiceError, match="key is wrong") as info:
        service.unwrap(format_wrapped("pkcs11", "tamper", "1", bytes(flipped)))
    assert info.value.reason == "wrong-key"
    with pytest.raises(KeyServiceError, match="key is wrong"):
        service.unwrap(format_wrapped("pkcs11", "other", "1", parsed.ciphertext))
    service.close()


def test_wrong_pin_unknown_token_missing_module_and_unset_pin_variable(
    softhsm: SoftHsm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WRONG_PIN", "000000")
    with pytest.raises(KeyServiceError, match="PIN was refused") as info:
        keys(softhsm, pin="${WRONG_PIN}").check("anything")
    assert info.value.reason == "refused"
    assert "000000" not in str(info.value)
    with pytest.raises(KeyServiceError, match="no such token") as info:
        keys(softhsm, token="no-such-token").check("anything")
    assert info.value.reason == "unavailable"
    with pytest.raises(KeyServiceError, match="module does not exist"):
        Pkcs11Keys(module=tmp_path / "nope.so", token="t", pin="${WRONG_PIN}").check("k")
    monkeypatch.delenv("UNSET_PIN_VARIABLE", raising=False)
    with pytest.raises(ConfigError, match="`UNSET_PIN_VARIABLE`, which is not set"):
        keys(softhsm, pin="${UNSET_PIN_VARIABLE}")
    assert os.environ[PIN_ENV]
