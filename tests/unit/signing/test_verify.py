"""Verification before a run, one tamper case at a time, on fabricated images (no engine)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from dativo.errors import ConfigError, SignatureError
from dativo.signing import (
    LABEL_MANIFEST,
    Grants,
    ImageFacts,
    VerifiedPlugin,
    canonical_json,
    policy_path,
    record_seen,
    revoke_key,
    set_allow_unsigned_local,
    signatures_dir,
    verify_plugin,
)
from tests.unit.signing.conftest import Keys, facts, image_id, manifest

JOB_RESOURCES = {"cpus": 1.0, "memory": 1 << 30, "pids": 128, "timeout": 3600.0}


def verify(image: ImageFacts, **options: Any) -> VerifiedPlugin:
    options.setdefault("role", "reader")
    options.setdefault("grants", Grants(resources=JOB_RESOURCES, field_path="source.reader"))
    options.setdefault("reference", "acme/gen:1")
    options.setdefault("plugin", "image:acme/gen:1")
    return verify_plugin(image, **options)


def refused(image: ImageFacts, check: str, *fragments: str, **options: Any) -> SignatureError:
    with pytest.raises(SignatureError) as caught:
        verify(image, **options)
    error = caught.value
    assert error.check == check, str(error)
    text = str(error)
    assert text.startswith("reader plugin `image:acme/gen:1`: ")
    assert "\n  fix: " in text
    for fragment in fragments:
        assert fragment in text
    return error


def test_a_signed_image_verifies(keys: Keys) -> None:
    image = facts()
    keys.sign(image)
    verified = verify(image)
    assert verified.signed is True
    assert verified.image_id == image.id
    assert (verified.publisher, verified.key_id) == ("acme", keys.acme.key_id)
    assert verified.manifest is not None
    assert verified.manifest.name == "acme/gen"
    # Limits the job did not set come from the manifest's defaults.
    assert verified.resources == {"cpus": 1.0, "memory": 512 << 20, "pids": 64, "timeout": 600.0}
    report = verified.report()
    assert report["manifest"] == {"name": "acme/gen", "version": "1.0.0"}
    assert report["signed"] is True
    assert 0 <= report["verify_seconds"] < 1


def test_unsigned_image(keys: Keys) -> None:
    refused(facts(), "unsigned", "has no signature (nothing in", "dativo plugin sign acme/gen:1")


def test_signature_removed(keys: Keys) -> None:
    image = facts()
    keys.sign(image).unlink()
    refused(image, "unsigned", "has no signature")


def test_image_without_manifest(keys: Keys) -> None:
    bare = ImageFacts(id=image_id("bare"), labels={})
    refused(bare, "unsigned", f"has no `{LABEL_MANIFEST}` label")


def test_invalid_manifest_label(keys: Keys) -> None:
    image = facts(manifest(version="latest"))
    refused(image, "manifest", "invalid `org.dativo.manifest` label", "`version`")


def test_wrong_key(keys: Keys) -> None:
    image = facts()
    keys.sign(image, keys.stranger)
    refused(
        image,
        "untrusted-key",
        f"made with key `{keys.stranger.key_id}`, which is not in the trust store",
        "dativo trust add",
    )


def test_key_not_trusted_for_that_plugin(keys: Keys) -> None:
    image = facts()
    keys.sign(image, keys.other)
    refused(
        image,
        "scope",
        "belongs to publisher `other`",
        "allows to sign `other/*` only, not `acme/gen`",
    )


def test_key_in_store_but_in_no_publisher(keys: Keys) -> None:
    image = facts()
    keys.sign(image, keys.stranger)
    stored = keys.home / "trust" / "keys" / f"{keys.stranger.key_id}.pub.json"
    stored.write_bytes(keys.stranger.public.to_bytes())
    refused(image, "untrusted-key", "is in the trust store but no publisher in")


def test_corrupted_signature(keys: Keys) -> None:
    image = facts()
    path = keys.sign(image)
    doc = json.loads(path.read_text())
    raw = bytearray(base64.b64decode(doc["signature"]))
    raw[10] ^= 0x01
    doc["signature"] = base64.b64encode(bytes(raw)).decode()
    path.write_text(json.dumps(doc))
    refused(image, "signature", "does not verify with key", "was altered")


def test_payload_edited_after_signing(keys: Keys) -> None:
    image = facts()
    path = keys.sign(image)
    doc = json.loads(path.read_text())
    payload = json.loads(base64.b64decode(doc["payload"]))
    payload["manifest"]["network"].append("evil.example.com:443")
    doc["payload"] = base64.b64encode(canonical_json(payload)).decode()
    path.write_text(json.dumps(doc))
    refused(image, "signature", "does not verify")


def test_manifest_edited_after_signing(keys: Keys) -> None:
    signed = facts()
    keys.sign(signed)
    # The same image ID with another label cannot come from an engine (the ID covers the
    # labels); this checks the verifier would notice anyway.
    edited = facts(manifest(network=["db.example.com:5432", "evil.example.com:443"]))
    refused(edited, "manifest-mismatch", "differs from the signed manifest (changed: network)")


def test_rebuilt_image_is_unsigned(keys: Keys) -> None:
    keys.sign(facts(seed="first build"))
    refused(facts(seed="second build"), "unsigned", "has no signature")


def test_signature_copied_from_another_image(keys: Keys) -> None:
    source = facts(seed="a")
    path = keys.sign(source)
    target = facts(seed="b")
    copy = signatures_dir(keys.home, target.id) / path.name
    copy.parent.mkdir(parents=True)
    copy.write_bytes(path.read_bytes())
    refused(
        target,
        "image-mismatch",
        f"made for image `{source.id[:19]}…`, not this image `{target.id[:19]}…`",
        "copied from another image",
    )


def test_expired_key(keys: Keys) -> None:
    image = facts()
    keys.sign(image)
    stored = keys.home / "trust" / "keys" / f"{keys.acme.key_id}.pub.json"
    data = json.loads(stored.read_text())
    data["expires_at"] = "2020-01-01T00:00:00Z"
    stored.write_text(json.dumps(data))
    refused(image, "expired", "expired at 2020-01-01T00:00:00Z")


def test_revoked_key(keys: Keys) -> None:
    image = facts()
    keys.sign(image)
    revoke_key(keys.acme.key_id)
    refused(image, "revoked", f"key `{keys.acme.key_id}` of publisher `acme` is revoked")


def test_older_version_than_one_already_run(keys: Keys) -> None:
    image = facts()
    keys.sign(image)
    record_seen("acme/gen", "1.0.0")
    assert verify(image).signed  # the same version again is fine
    record_seen("acme/gen", "1.2.0")
    refused(image, "rollback", "`acme/gen` 1.0.0 is older than version 1.2.0")


def test_kind_entrypoint_and_name_must_match(keys: Keys) -> None:
    image = facts()
    keys.sign(image)
    with pytest.raises(SignatureError, match="a reader, but the job uses it as the writer"):
        verify(image, role="writer")
    moved = facts()
    moved = ImageFacts(id=moved.id, labels=moved.labels, entrypoint=("sh", "-c", "evil"))
    refused(moved, "entrypoint", "runs `['sh', '-c', 'evil']` but its manifest declares")
    refused(
        image, "name", "is the plugin `acme/gen`, not `dativo/files`", expected_name="dativo/files"
    )


def test_network_grants_must_be_declared(keys: Keys) -> None:
    image = facts()
    keys.sign(image)
    ok = Grants(network=("db.example.com:5432",), resources=JOB_RESOURCES, field_path="x")
    assert verify(image, grants=ok).signed
    too_much = Grants(
        network=("db.example.com:5432", "evil.example.com:443"),
        resources=JOB_RESOURCES,
        field_path="source.reader",
    )
    with pytest.raises(ConfigError) as caught:
        verify(image, grants=too_much)
    assert caught.value.field == "source.reader.network"
    assert "grants `evil.example.com:443`" in str(caught.value)
    assert "it declares: `db.example.com:5432`" in str(caught.value)


def test_resources_above_the_manifest_maximum(keys: Keys) -> None:
    image = facts()
    keys.sign(image)
    grants = Grants(
        resources={**JOB_RESOURCES, "memory": 4 << 30},
        explicit=frozenset({"memory"}),
        field_path="source.reader",
    )
    with pytest.raises(ConfigError) as caught:
        verify(image, grants=grants)
    assert caught.value.field == "source.reader.resources.memory"
    assert "is 4GiB, above the 2GiB that the signed manifest of `acme/gen` 1.0.0 allows" in str(
        caught.value
    )
    fine = Grants(
        resources={**JOB_RESOURCES, "memory": 2 << 30},
        explicit=frozenset({"memory"}),
        field_path="source.reader",
    )
    assert verify(image, grants=fine).resources["memory"] == 2 << 30


def test_one_valid_signature_among_bad_ones_suffices(keys: Keys) -> None:
    image = facts()
    keys.sign(image, keys.stranger)
    keys.sign(image)
    (signatures_dir(keys.home, image.id) / "junk.sig.json").write_text("{}")
    assert verify(image).publisher == "acme"


def test_unreadable_and_symlinked_signature_files(keys: Keys, tmp_path: Path) -> None:
    image = facts()
    directory = signatures_dir(keys.home, image.id)
    directory.mkdir(parents=True)
    (directory / "junk.sig.json").write_text("[]")
    refused(image, "signature", "unreadable signature file")
    (directory / "junk.sig.json").unlink()
    real = keys.sign(facts(), keys.acme)
    moved = tmp_path / "elsewhere.sig.json"
    real.rename(moved)
    (directory / "link.sig.json").symlink_to(moved)
    refused(image, "signature", "unreadable signature file")


def test_allow_unsigned_local_is_narrow(keys: Keys) -> None:
    set_allow_unsigned_local(True)
    local = facts()
    verified = verify(local)
    assert verified.signed is False
    assert verified.publisher is None
    pulled = facts(repo_digests=("acme/gen@sha256:" + "1" * 64,))
    refused(pulled, "unsigned", "came from a registry")
    # A signature that is there but wrong is an attack, not a development image.
    keys.sign(local, keys.stranger)
    refused(local, "untrusted-key", "not in the trust store")


def test_local_python_code(keys: Keys) -> None:
    runtime = ImageFacts(id=image_id("runtime"), labels={}, entrypoint=("python3",))
    error = refused(runtime, "unsigned", "local code (`type: python`", local_code=True)
    assert "dativo trust allow-unsigned-local on" in str(error)
    set_allow_unsigned_local(True)
    assert verify(runtime, local_code=True).signed is False
    grants = Grants(network=("db:1",), resources=JOB_RESOURCES, field_path="source.reader")
    # Local code has no manifest: the job's grant alone applies (the supervisor warns loudly).
    assert verify(runtime, local_code=True, grants=grants).signed is False
    # An unsigned *image* without a manifest declares nothing, so it may be granted nothing.
    with pytest.raises(ConfigError, match="this unsigned plugin"):
        verify(runtime, grants=grants)


def test_malformed_policy_refuses_every_run(keys: Keys) -> None:
    image = facts()
    keys.sign(image)
    policy_path(keys.home).write_text("version: 1\npublishers: 7\n")
    with pytest.raises(ConfigError, match="invalid trust policy"):
        verify(image)
