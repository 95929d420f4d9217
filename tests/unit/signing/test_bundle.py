"""Bundles: export, and import that verifies everything before the engine sees the image."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from dativo.errors import SignatureError
from dativo.signing import (
    LABEL_MANIFEST,
    ImageFacts,
    SignatureFile,
    import_bundle,
    read_signature_files,
    sign_image,
    signatures_dir,
    write_bundle,
)
from tests.unit.signing.conftest import Keys, docker_save_archive, manifest


class Engine:
    """Records what would have been loaded."""

    def __init__(self) -> None:
        self.loaded: list[Path] = []
        self.answer: list[str] | None = None

    def load(self, archive: Path) -> list[str]:
        self.loaded.append(archive)
        if self.answer is not None:
            return self.answer
        with tarfile.open(archive) as tar:
            handle = tar.extractfile("manifest.json")
            assert handle is not None
            config = json.loads(handle.read())[0]["Config"]
        return ["sha256:" + config.removesuffix(".json")]


def make_bundle(
    keys: Keys, tmp_path: Path, *, key: Any = None, data: dict[str, Any] | None = None
) -> tuple[Path, str]:
    data = data or manifest()
    archive = tmp_path / "image.tar"
    image_id = docker_save_archive(archive, data, [b"layer one", b"layer two"])
    image = ImageFacts(
        id=image_id, labels={LABEL_MANIFEST: json.dumps(data)}, entrypoint=tuple(data["entrypoint"])
    )
    signature, _ = sign_image(image, key or keys.acme)
    out = tmp_path / "gen.dativo"
    write_bundle(
        out,
        image_tar=archive,
        image_id=image_id,
        manifest=data,
        signatures=[signature],
        tags=["acme/gen:1.0.0"],
    )
    return out, image_id


def rewrite(bundle: Path, change: Any) -> None:
    """Rewrite the bundle's members through `change(name, data) -> data | None` (None drops)."""
    with tarfile.open(bundle) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]
    with tarfile.open(bundle, "w") as tar:
        for member, data in members:
            new = change(member.name, data)
            if new is None:
                continue
            member.size = len(new)
            tar.addfile(member, io.BytesIO(new))


def refused(bundle: Path, engine: Engine, *fragments: str) -> SignatureError:
    with pytest.raises(SignatureError) as caught:
        import_bundle(bundle, load=engine.load)
    assert engine.loaded == [], "the engine saw the image of a bundle that failed"
    for fragment in fragments:
        assert fragment in str(caught.value)
    return caught.value


def test_export_then_import(keys: Keys, tmp_path: Path) -> None:
    bundle, image_id = make_bundle(keys, tmp_path)
    engine = Engine()
    result = import_bundle(bundle, load=engine.load)
    assert result.image_id == image_id
    assert result.manifest.name == "acme/gen"
    assert (result.publisher, result.key_id) == ("acme", keys.acme.key_id)
    assert result.tags == ("acme/gen:1.0.0",)
    assert len(engine.loaded) == 1
    installed = read_signature_files(signatures_dir(keys.home, image_id))
    assert [s.key_id for s in installed if isinstance(s, SignatureFile)] == [keys.acme.key_id]


def test_tampered_image_archive(keys: Keys, tmp_path: Path) -> None:
    bundle, _ = make_bundle(keys, tmp_path)

    def flip(name: str, data: bytes) -> bytes:
        if name != "image.tar":
            return data
        edited = bytearray(data)
        edited[-2000] ^= 1
        return bytes(edited)

    rewrite(bundle, flip)
    refused(bundle, Engine(), "the bundle member `image.tar` was altered")


def test_tampered_archive_with_a_matching_index(keys: Keys, tmp_path: Path) -> None:
    """An attacker who also fixes the index hashes is caught by the image ID and signature."""
    bundle, _ = make_bundle(keys, tmp_path)
    evil = tmp_path / "evil.tar"
    docker_save_archive(evil, manifest(network=["evil.example.com:443"]), [b"evil layer"])
    evil_bytes = evil.read_bytes()

    def swap(name: str, data: bytes) -> bytes:
        if name == "image.tar":
            return evil_bytes
        if name == "index.json":
            index = json.loads(data)
            index["members"]["image.tar"] = "sha256:" + hashlib.sha256(evil_bytes).hexdigest()
            return json.dumps(index).encode()
        return data

    rewrite(bundle, swap)
    refused(bundle, Engine(), "but its archive holds image")


def test_tampered_layer(keys: Keys, tmp_path: Path) -> None:
    data = manifest()
    archive = tmp_path / "image.tar"
    image_id = docker_save_archive(archive, data, [b"layer one"])
    # Replace the layer's bytes but keep the config (and so the image ID).
    with tarfile.open(archive) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]
    with tarfile.open(archive, "w") as tar:
        for member, content in members:
            new = b"evil layer" if member.name.endswith("layer.tar") else content
            member.size = len(new)
            tar.addfile(member, io.BytesIO(new))
    image = ImageFacts(
        id=image_id, labels={LABEL_MANIFEST: json.dumps(data)}, entrypoint=tuple(data["entrypoint"])
    )
    signature, _ = sign_image(image, keys.acme)
    bundle = tmp_path / "b.dativo"
    write_bundle(
        bundle, image_tar=archive, image_id=image_id, manifest=data, signatures=[signature]
    )
    refused(bundle, Engine(), "layer 0 does not match the image config's `rootfs.diff_ids`")


def test_untrusted_and_unsigned_bundles(keys: Keys, tmp_path: Path) -> None:
    bundle, _ = make_bundle(keys, tmp_path, key=keys.stranger)
    error = refused(bundle, Engine(), "has no valid signature", "not in the trust store")
    assert error.check == "untrusted-key"
    bundle, _ = make_bundle(keys, tmp_path, key=keys.other)
    assert refused(bundle, Engine(), "allows to sign `other/*` only").check == "scope"

    def drop_signatures(name: str, data: bytes) -> bytes | None:
        if name.startswith("signatures/"):
            return None
        if name == "index.json":
            index = json.loads(data)
            index["members"] = {"image.tar": index["members"]["image.tar"]}
            return json.dumps(index).encode()
        return data

    rewrite(bundle, drop_signatures)
    assert refused(bundle, Engine(), "holds no signature").check == "unsigned"


def test_signature_dropped_without_fixing_the_index(keys: Keys, tmp_path: Path) -> None:
    bundle, _ = make_bundle(keys, tmp_path)
    rewrite(bundle, lambda name, data: None if name.startswith("signatures/") else data)
    refused(bundle, Engine(), "do not match its index; missing: signatures/")


def _add_member(bundle: Path, info: tarfile.TarInfo, data: bytes = b"") -> None:
    with tarfile.open(bundle, "a") as tar:
        tar.addfile(info, io.BytesIO(data) if data else None)


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("../../etc/passwd", tarfile.REGTYPE, "unsafe path"),
        ("/etc/passwd", tarfile.REGTYPE, "unsafe path"),
        ("signatures/0123456789abcdef.sig.json", tarfile.SYMTYPE, "not a regular file"),
        ("signatures", tarfile.DIRTYPE, "not a regular file"),
        ("notes.txt", tarfile.REGTYPE, "unexpected member `notes.txt`"),
        ("index.json", tarfile.REGTYPE, "holds `index.json` twice"),
    ],
)
def test_hostile_members_are_refused(
    keys: Keys, tmp_path: Path, name: str, kind: bytes, message: str
) -> None:
    bundle, _ = make_bundle(keys, tmp_path)
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind == tarfile.SYMTYPE:
        info.linkname = "/root/.ssh/id_ed25519"
    data = b"x" if kind == tarfile.REGTYPE else b""
    info.size = len(data)
    _add_member(bundle, info, data)
    refused(bundle, Engine(), message)


def test_oversized_members_are_refused(keys: Keys, tmp_path: Path) -> None:
    bundle, _ = make_bundle(keys, tmp_path)
    rewrite(bundle, lambda name, data: data + b" " * (1 << 20) if name == "index.json" else data)
    refused(bundle, Engine(), "the bundle member `index.json` is", "more than the 1MiB allowed")


def test_not_a_bundle(keys: Keys, tmp_path: Path) -> None:
    junk = tmp_path / "junk.dativo"
    junk.write_bytes(b"hello")
    refused(junk, Engine(), "is not a bundle")


def test_engine_loading_something_else_is_caught(keys: Keys, tmp_path: Path) -> None:
    bundle, image_id = make_bundle(keys, tmp_path)
    engine = Engine()
    engine.answer = ["sha256:" + "0" * 64]
    with pytest.raises(SignatureError, match="instead of the verified image"):
        import_bundle(bundle, load=engine.load)
    assert not signatures_dir(keys.home, image_id).exists()
