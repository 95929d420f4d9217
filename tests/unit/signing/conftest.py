"""Keys, a trust store and fabricated images for the signing tests (no engine needed)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dativo.signing import (
    LABEL_MANIFEST,
    ImageFacts,
    PrivateKey,
    add_trusted_key,
    generate_key,
    load_private_key,
    sign_image,
    signatures_dir,
)


def manifest(**changes: Any) -> dict[str, Any]:
    """A valid reader manifest of `acme/gen` 1.0.0."""
    data: dict[str, Any] = {
        "manifest_version": 1,
        "name": "acme/gen",
        "version": "1.0.0",
        "kind": "reader",
        "protocol": 1,
        "entrypoint": ["python3", "-m", "dativo.host", "acme.gen:Reader"],
        "description": "test reader",
        "network": ["db.example.com:5432"],
        "resources": {
            "default": {"cpus": 1, "memory": "512MiB", "pids": 64, "timeout": "10m"},
            "max": {"cpus": 2, "memory": "2GiB", "pids": 128, "timeout": "1h"},
        },
        "config_schema": {"type": "object", "properties": {"password": {"type": "string"}}},
        "secrets": ["password"],
    }
    data.update(changes)
    return data


def image_id(seed: str) -> str:
    return "sha256:" + hashlib.sha256(seed.encode()).hexdigest()


def facts(data: dict[str, Any] | None = None, *, seed: str = "a", **extra: Any) -> ImageFacts:
    data = manifest() if data is None else data
    return ImageFacts(
        id=image_id(seed),
        labels={LABEL_MANIFEST: json.dumps(data)},
        entrypoint=tuple(data["entrypoint"]),
        **extra,
    )


@dataclass
class Keys:
    home: Path
    acme: PrivateKey
    other: PrivateKey  # trusted, but for `other/*` only
    stranger: PrivateKey  # not in the trust store

    def sign(self, image: ImageFacts, key: PrivateKey | None = None) -> Path:
        """Sign `image` and store the signature where verification looks."""
        key = key or self.acme
        signature, _ = sign_image(image, key)
        directory = signatures_dir(self.home, image.id)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{key.key_id}.sig.json"
        path.write_bytes(signature.to_bytes())
        return path


def _key(directory: Path, name: str) -> PrivateKey:
    key_path, _, _ = generate_key(name, directory)
    return load_private_key(key_path)


@pytest.fixture
def keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Keys:
    home = tmp_path / "home"
    monkeypatch.setenv("DATIVO_HOME", str(home))
    made = Keys(
        home=home,
        acme=_key(tmp_path / "keys", "acme"),
        other=_key(tmp_path / "keys", "other"),
        stranger=_key(tmp_path / "keys", "stranger"),
    )
    add_trusted_key(made.acme.public, publisher="acme", plugins=["acme/*"])
    add_trusted_key(made.other.public, publisher="other", plugins=["other/*"])
    return made


def docker_save_archive(path: Path, data: dict[str, Any], layers: list[bytes]) -> str:
    """Write a `docker save`-style archive of a fabricated image; return its image ID."""
    diff_ids = ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Labels": {LABEL_MANIFEST: json.dumps(data)}, "Entrypoint": data["entrypoint"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config_bytes = json.dumps(config).encode()
    digest = hashlib.sha256(config_bytes).hexdigest()
    members = {f"{digest}.json": config_bytes}
    names = []
    for number, layer in enumerate(layers):
        names.append(f"layer{number}/layer.tar")
        members[names[-1]] = layer
    members["manifest.json"] = json.dumps(
        [{"Config": f"{digest}.json", "RepoTags": None, "Layers": names}]
    ).encode()
    with tarfile.open(path, "w") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return "sha256:" + digest
