"""Keys, the trust store and the policy: generation, loading, malformed files, edits."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from dativo.errors import ConfigError
from dativo.signing import (
    add_trusted_key,
    generate_key,
    load_private_key,
    load_public_key,
    load_trust,
    policy_path,
    record_seen,
    revoke_key,
)
from tests.unit.signing.conftest import Keys


def test_generate_writes_a_private_pair_and_never_overwrites(tmp_path: Path) -> None:
    key_path, pub_path, public = generate_key("acme-release", tmp_path / "k", publisher="acme")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert key_path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    data = json.loads(pub_path.read_text())
    assert data["key_id"] == public.key_id
    assert len(public.key_id) == 16
    assert data["publisher"] == "acme"
    assert load_public_key(pub_path).raw == public.raw
    assert load_public_key(pub_path) == public.__class__(
        **{**public.__dict__, "source": str(pub_path)}
    )
    key = load_private_key(key_path)
    assert key.key_id == public.key_id
    with pytest.raises(ConfigError, match="exists already; keys are never overwritten"):
        generate_key("acme-release", tmp_path / "k")


def test_private_key_must_match_its_public_file(tmp_path: Path) -> None:
    key_a, _, _ = generate_key("a", tmp_path)
    _, pub_b, _ = generate_key("b", tmp_path)
    (tmp_path / "a.pub.json").write_bytes(pub_b.read_bytes())
    with pytest.raises(ConfigError, match="is not the public half of"):
        load_private_key(key_a)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(key_id="0" * 16), "`key_id`: `0000000000000000` is not the key's id"),
        (lambda d: d.update(public_key="!!"), "`public_key`: not base64"),
        (lambda d: d.update(public_key="AAAA"), "an Ed25519 public key is 32 bytes, not 3"),
        (lambda d: d.update(expires_at="tomorrow"), "`expires_at`: `tomorrow` is not an ISO"),
        (lambda d: d.update(expires_at="2030-01-01T00:00:00"), "has no time zone"),
        (lambda d: d.update(colour="red"), "`colour`: unknown field"),
        (lambda d: d.pop("publisher"), "`publisher`: missing; required"),
    ],
)
def test_malformed_public_keys_name_the_file_and_field(
    tmp_path: Path, edit: object, message: str
) -> None:
    _, pub_path, _ = generate_key("acme", tmp_path)
    data = json.loads(pub_path.read_text())
    edit(data)  # type: ignore[operator]
    pub_path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as caught:
        load_public_key(pub_path)
    assert str(pub_path) in str(caught.value)
    assert message in str(caught.value)


def test_trust_add_is_idempotent_and_revocation_is_final(keys: Keys) -> None:
    assert add_trusted_key(keys.acme.public, publisher="acme", plugins=["acme/*"]) == []
    changes = add_trusted_key(keys.acme.public, publisher="acme", plugins=["acme/x", "acme/*"])
    assert changes == ["publisher `acme` may now sign acme/*, acme/x"]
    trust = load_trust()
    assert trust.policy.publisher_of(keys.acme.key_id).plugins == ["acme/*", "acme/x"]  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="already belongs to publisher `acme`"):
        add_trusted_key(keys.acme.public, publisher="evil", plugins=["evil/*"])
    assert revoke_key(keys.acme.key_id) is True
    assert revoke_key(keys.acme.key_id) is False
    assert keys.acme.key_id in load_trust().policy.revoked_keys
    with pytest.raises(ConfigError, match="is revoked"):
        add_trusted_key(keys.acme.public, publisher="acme", plugins=["acme/*"])


def test_seen_versions_only_go_up(keys: Keys) -> None:
    assert record_seen("acme/gen", "1.2.0") is True
    assert record_seen("acme/gen", "1.10.0") is True
    assert record_seen("acme/gen", "1.9.0") is False
    assert load_trust().seen == {"acme/gen": "1.10.0"}


def test_no_policy_refuses_with_the_way_out(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_trust(tmp_path)
    assert f"no trust policy at `{policy_path(tmp_path)}`" in str(caught.value)
    assert "make images" in str(caught.value)


POLICY_PROBLEMS = [
    ("version: 1\npublishers: [\n", "not a readable YAML file"),
    ("- just a list\n", "a trust policy is a mapping"),
    ("version: 2\n", "`version`: Input should be 1"),
    ("version: 1\nversion: 1\n", "the key `version` appears twice"),
    ("version: 1\nallow_unsigned: true\n", "`allow_unsigned`: unknown field"),
    ("version: 1\nallow_unsigned_local: maybe\n", "`allow_unsigned_local`"),
    ("version: 1\nrevoked_keys: [abc]\n", "`abc` is not a key id"),
    (
        "version: 1\npublishers: [{name: Acme, keys: [0123456789abcdef], plugins: ['a/*']}]\n",
        "`publishers[0].name`",
    ),
    (
        "version: 1\npublishers: [{name: acme, keys: [0123456789abcdef], plugins: ['*']}]\n",
        "is not a pattern of plugin names",
    ),
    (
        "version: 1\npublishers: [{name: acme, keys: [], plugins: ['a/*']}]\n",
        "`publishers[0].keys`",
    ),
    (
        "version: 1\npublishers: [{name: acme, keys: [0123456789abcdef], plugins: ['a/*']}]\n",
        "lists key `0123456789abcdef`, which is not in the trust store",
    ),
]


@pytest.mark.parametrize(("text", "message"), POLICY_PROBLEMS)
def test_malformed_policy_refuses_naming_file_and_field(
    keys: Keys, text: str, message: str
) -> None:
    path = policy_path(keys.home)
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_trust()
    assert str(path) in str(caught.value)
    assert message in str(caught.value)


def test_a_key_of_two_publishers_is_refused(keys: Keys) -> None:
    key = keys.acme.key_id
    policy_path(keys.home).write_text(
        f"version: 1\npublishers:\n- {{name: a, keys: [{key}], plugins: ['a/*']}}\n"
        f"- {{name: b, keys: [{key}], plugins: ['b/*']}}\n"
    )
    with pytest.raises(ConfigError, match="belongs to both `a` and `b`"):
        load_trust()


def test_malformed_trust_store_and_seen_file_refuse(keys: Keys) -> None:
    stored = keys.home / "trust" / "keys" / f"{keys.acme.key_id}.pub.json"
    original = stored.read_text()
    stored.write_text("{not json")
    with pytest.raises(ConfigError, match=f"{stored}: not JSON"):
        load_trust()
    stored.write_text(original)
    (keys.home / "trust" / "keys" / "renamed.pub.json").write_text(original)
    with pytest.raises(ConfigError, match=r"trusted keys are stored as `<key id>\.pub\.json`"):
        load_trust()
    (keys.home / "trust" / "keys" / "renamed.pub.json").unlink()
    seen = keys.home / "trust" / "seen.json"
    seen.write_text('{"version": 1, "plugins": {"acme/gen": "one"}}')
    with pytest.raises(ConfigError, match=r"`plugins\.acme/gen`: `one` is not a semantic version"):
        load_trust()
