"""`dativo keys|trust` without an engine, and how a verified launch is adjusted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dativo import __version__
from dativo.cli import main
from dativo.config import parse_job
from dativo.errors import ConfigError, SignatureError
from dativo.sandbox import ImageInfo
from dativo.signing import LABEL_MANIFEST, load_trust, sign_image, signatures_dir
from dativo.supervisor._plugins import resolve, verify_launch
from tests.unit.signing.conftest import Keys, facts, manifest


def test_keys_and_trust_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATIVO_HOME", str(tmp_path / "home"))
    assert main(["keys", "generate", "acme", "--expires", "30d"]) == 0
    out = capsys.readouterr().out
    assert "never commit it" in out
    key_dir = tmp_path / "home" / "keys"
    assert (key_dir / "acme.key").is_file()
    pub = key_dir / "acme.pub.json"
    key_id = json.loads(pub.read_text())["key_id"]
    assert "expires_at" in json.loads(pub.read_text())
    assert main(["keys", "generate", "acme"]) == 1
    assert "keys are never overwritten" in capsys.readouterr().err

    assert main(["trust", "add", str(pub), "--plugins", "acme/*"]) == 0
    assert "added publisher `acme` signing acme/*" in capsys.readouterr().out
    assert main(["trust", "add", str(pub), "--plugins", "acme/*"]) == 0
    assert "unchanged" in capsys.readouterr().out

    assert main(["trust", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["publishers"] == [{"name": "acme", "keys": [key_id], "plugins": ["acme/*"]}]
    assert listed["allow_unsigned_local"] is False

    assert main(["trust", "allow-unsigned-local", "on"]) == 0
    captured = capsys.readouterr()
    assert "!! allow_unsigned_local is ON" in captured.err
    assert load_trust().policy.allow_unsigned_local is True
    assert main(["trust", "list"]) == 0
    assert "allow_unsigned_local: ON" in capsys.readouterr().out

    assert main(["trust", "revoke", key_id]) == 0
    assert main(["trust", "list"]) == 0
    assert f"key {key_id}  REVOKED" in capsys.readouterr().out
    assert main(["trust", "revoke", "nonsense"]) == 1
    assert "is not a key id" in capsys.readouterr().err


def _job(tmp_path: Path, reader: dict[str, Any]) -> Any:
    return parse_job(
        {
            "version": 1,
            "name": "t",
            "source": {"reader": reader},
            "target": {"writer": {"type": "builtin", "name": "null"}},
        },
        base_dir=tmp_path,
    )


def _info(image: Any) -> ImageInfo:
    return ImageInfo(
        id=image.id, tags=(), labels=dict(image.labels), entrypoint=image.entrypoint, cmd=None
    )


def test_a_verified_launch_takes_the_manifest_defaults(keys: Keys, tmp_path: Path) -> None:
    image = facts()
    keys.sign(image)
    spec = {"type": "image", "image": "acme/gen:1", "resources": {"cpus": 2}}
    launch = resolve(_job(tmp_path, spec), "reader", None)
    assert launch.command == ()
    launched, verified = verify_launch(launch, _info(image))
    assert verified.signed
    resources = launched.spec.resources
    assert resources.cpus == 2  # set by the job, within the manifest's max
    assert resources.memory == 512 << 20  # the manifest's default, not the job file's 1GiB
    assert (resources.pids, resources.timeout) == (64, 600)


def test_a_signed_entrypoint_cannot_be_overridden(keys: Keys, tmp_path: Path) -> None:
    image = facts()
    keys.sign(image)
    same = {"type": "image", "image": "acme/gen:1", "implementation": "acme.gen:Reader"}
    launch = resolve(_job(tmp_path, same), "reader", None)
    assert launch.command == ("acme.gen:Reader",)
    launched, _ = verify_launch(launch, _info(image))
    assert launched.command == ()  # the signed entrypoint names it already
    other = {"type": "image", "image": "acme/gen:1", "implementation": "evil.mod:Other"}
    with pytest.raises(ConfigError, match="fixes what the image runs"):
        verify_launch(resolve(_job(tmp_path, other), "reader", None), _info(image))


def test_builtins_resolve_to_their_own_images(keys: Keys, tmp_path: Path) -> None:
    launch = resolve(_job(tmp_path, {"type": "builtin", "name": "generate"}), "reader", None)
    assert launch.image == f"dativo/builtin-generate:{__version__}"
    assert launch.command == ()
    assert launch.implementation == "dativo.connectors.generate:GenerateReader"  # in-process
    # An image posing as a built-in under its tag is refused by name.
    impostor = facts(manifest())
    keys.sign(impostor)
    with pytest.raises(SignatureError, match="is the plugin `acme/gen`, not `dativo/generate`"):
        verify_launch(launch, _info(impostor))


def test_signature_files_are_written_where_verification_looks(keys: Keys) -> None:
    image = facts()
    signature, _ = sign_image(image, keys.acme)
    assert keys.sign(image) == signatures_dir(keys.home, image.id) / f"{keys.acme.key_id}.sig.json"
    assert json.loads(signature.to_bytes())["key_id"] == keys.acme.key_id
    assert LABEL_MANIFEST in image.labels
