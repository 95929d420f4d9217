"""The `file` key service: permissions, rotation, revocation, wrong keys and tampering."""

from __future__ import annotations

import base64
import json
import os
import secrets
from pathlib import Path

import pytest

from dativo.keys import KeyServiceError, format_wrapped, parse_wrapped
from dativo.keys._file import FileKeys, create_key_file, revoke_version, rotate_key
from tests.unit.keys.helpers import key_file


def test_wrap_unwrap_round_trip_and_the_wrapped_key_names_key_and_version(tmp_path: Path) -> None:
    keys = FileKeys(key_file(tmp_path))
    dek = secrets.token_bytes(32)
    wrapped = keys.wrap("pii", dek)
    parsed = parse_wrapped(wrapped, service="file")
    assert (parsed.service, parsed.key_id, parsed.version) == ("file", "pii", "1")
    assert dek not in wrapped.encode()
    assert base64.b64encode(dek) not in wrapped.encode()
    assert keys.unwrap(wrapped) == dek
    assert keys.check("data").version == "1"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_key_file_others_can_read_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    path = key_file(tmp_path)
    os.chmod(path, mode)
    with pytest.raises(KeyServiceError, match=r"chmod 600") as info:
        FileKeys(path)
    assert info.value.reason == "config"
    assert f"{mode:04o}" in str(info.value)


def test_a_key_file_owned_by_someone_else_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = key_file(tmp_path)
    monkeypatch.setattr("dativo.keys._file.os.geteuid", lambda: path.stat().st_uid + 1)
    with pytest.raises(KeyServiceError, match="owned by uid"):
        FileKeys(path)


def test_a_symlinked_missing_or_malformed_key_file_is_refused(tmp_path: Path) -> None:
    path = key_file(tmp_path)
    link = tmp_path / "link.json"
    link.symlink_to(path)
    with pytest.raises(KeyServiceError, match="cannot open"):
        FileKeys(link)
    with pytest.raises(KeyServiceError, match="does not exist") as info:
        FileKeys(tmp_path / "absent.json")
    assert info.value.reason == "missing"
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"version": 1, "keys": {"k": {"current": 1, "versions": {"1": "AA=="}}}})
    )
    os.chmod(bad, 0o600)
    with pytest.raises(KeyServiceError, match="32 bytes") as info:
        FileKeys(bad)
    assert "AA==" not in str(info.value)


def test_rotation_new_version_wraps_old_versions_still_unwrap(tmp_path: Path) -> None:
    path = key_file(tmp_path)
    old = FileKeys(path).wrap("pii", b"k" * 32)
    assert rotate_key(path, "pii") == 2
    keys = FileKeys(path)
    new = keys.wrap("pii", b"n" * 32)
    assert parse_wrapped(new, service="file").version == "2"
    assert keys.check("pii").version == "2"
    assert keys.unwrap(old) == b"k" * 32
    assert keys.unwrap(new) == b"n" * 32


def test_a_revoked_version_unwraps_nothing_and_a_revoked_current_wraps_nothing(
    tmp_path: Path,
) -> None:
    path = key_file(tmp_path)
    old = FileKeys(path).wrap("pii", b"k" * 32)
    rotate_key(path, "pii")
    revoke_version(path, "pii", 1)
    keys = FileKeys(path)
    with pytest.raises(KeyServiceError, match="version 1 is revoked") as info:
        keys.unwrap(old)
    assert (info.value.reason, info.value.key_id, info.value.service) == ("revoked", "pii", "file")
    revoke_version(path, "pii", 2)
    with pytest.raises(KeyServiceError, match="version 2 is revoked"):
        FileKeys(path).wrap("pii", b"x" * 32)


def test_a_wrong_key_a_missing_key_and_a_tampered_wrapped_key_are_clear_errors(
    tmp_path: Path,
) -> None:
    keys = FileKeys(key_file(tmp_path))
    wrapped = keys.wrap("pii", b"k" * 32)
    (tmp_path / "other").mkdir()
    other = FileKeys(key_file(tmp_path / "other"))
    with pytest.raises(KeyServiceError, match="key is wrong") as info:
        other.unwrap(wrapped)
    assert info.value.reason == "wrong-key"
    with pytest.raises(KeyServiceError, match="no such key") as info:
        keys.wrap("nope", b"k" * 32)
    assert info.value.reason == "missing"
    parsed = parse_wrapped(wrapped, service="file")
    flipped = bytearray(parsed.ciphertext)
    flipped[-1] ^= 1
    tampered = format_wrapped("file", "pii", "1", bytes(flipped))
    with pytest.raises(KeyServiceError, match="modified") as info:
        keys.unwrap(tampered)
    assert info.value.reason == "wrong-key"
    # Moved to another key id: the key id is bound as associated data.
    moved = format_wrapped("file", "data", "1", parsed.ciphertext)
    with pytest.raises(KeyServiceError, match="key is wrong"):
        keys.unwrap(moved)
    with pytest.raises(KeyServiceError, match="malformed") as info:
        keys.unwrap("not-a-wrapped-key")
    assert info.value.reason == "malformed"
    with pytest.raises(KeyServiceError, match="wrapped by the `kms` key service"):
        keys.unwrap(format_wrapped("kms", "pii", "arn", b"x"))


def test_create_refuses_to_overwrite_and_writes_mode_0600(tmp_path: Path) -> None:
    path = key_file(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(KeyServiceError, match="exists already"):
        create_key_file(path, ["x"])
