"""Signed plugin images with a real engine: the tamper suite, bundles end to end, and the cost.

Every tamper case must be refused before any container of the run is created (checked with the
engine's event log, so even a container created and removed at once would be seen) and with a
message saying what failed. Test images are tagged `dativo-test/signing-*` and removed at the
end; most are `FROM scratch` (they are refused before anything runs), the ones that really run
are built `FROM dativo/plugin-python:<version>`.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml

from dativo import __version__
from dativo.cli import main
from dativo.config import parse_job
from dativo.errors import ConfigError, DativoError, SignatureError
from dativo.sandbox import LABEL_RUN_DIR, Engine, runtime_base
from dativo.signing import (
    LABEL_MANIFEST,
    Grants,
    Policy,
    PrivateKey,
    add_trusted_key,
    canonical_json,
    generate_key,
    load_private_key,
    load_trust,
    revoke_key,
    signatures_dir,
    verify_plugin,
)
from dativo.signing._trust import POLICY_HEADER, policy_path
from dativo.supervisor import run_job

pytestmark = pytest.mark.docker

PLUGIN_IMAGE = f"dativo/plugin-python:{__version__}"
PREFIX = "dativo-test/signing-"
READER = ["python3", "-m", "dativo.host", "dativo.connectors.generate:GenerateReader"]
DOCKER_ENV = {**os.environ, "DOCKER_BUILDKIT": "0", "DOCKER_CLI_HINTS": "false"}
_BUILT: list[str] = []


def docker_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, env=DOCKER_ENV
    )


def manifest(name: str = "acme/gen", version: str = "1.0.0", **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "manifest_version": 1,
        "name": name,
        "version": version,
        "kind": "reader",
        "protocol": 1,
        "entrypoint": READER,
        "description": "a test reader",
        "network": ["db.example.com:5432"],
        "resources": {
            "default": {"cpus": 0.5, "memory": "256MiB", "pids": 64, "timeout": "5m"},
            "max": {"cpus": 1, "memory": "1GiB", "pids": 128, "timeout": "1h"},
        },
        "config_schema": {"type": "object"},
        "secrets": [],
    }
    data.update(changes)
    return data


def build(
    tag: str, data: dict[str, Any], context: Path, *, runnable: bool = False, marker: str = "1"
) -> str:
    """Build a test image with `data` as its manifest label; return its image ID."""
    context.mkdir(parents=True, exist_ok=True)
    (context / "marker").write_text(marker)
    base = PLUGIN_IMAGE if runnable else "scratch"
    entrypoint = json.dumps(data["entrypoint"])
    (context / "Dockerfile").write_text(
        f"FROM {base}\nCOPY marker /dativo-test-marker\nENTRYPOINT {entrypoint}\n"
    )
    proc = docker_cli(
        "build",
        "--quiet",
        "--network",
        "none",
        "--label",
        f"{LABEL_MANIFEST}={canonical_json(data).decode()}",
        "--tag",
        tag,
        str(context),
    )
    assert proc.returncode == 0, proc.stderr
    image_id = docker_cli("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
    _BUILT.extend([tag, image_id])
    return image_id


@pytest.fixture(scope="module", autouse=True)
def remove_test_images(docker_engine: str) -> Iterator[None]:
    if docker_cli("image", "inspect", PLUGIN_IMAGE).returncode != 0:
        pytest.fail(f"{PLUGIN_IMAGE} does not exist: run `make images`", pytrace=False)
    yield
    for reference in reversed(_BUILT):
        docker_cli("image", "rm", "--force", reference)


@pytest.fixture
def client(docker_engine: str) -> Any:
    return docker.from_env()


@dataclass
class Home:
    """A strict DATIVO_HOME: built-ins trusted, `acme` for `acme/*`, `other` for `other/*`,
    `stranger` not trusted, and no unsigned images."""

    path: Path
    keys: Path
    acme: PrivateKey
    other: PrivateKey
    stranger: PrivateKey

    def key_file(self, key: PrivateKey) -> Path:
        return self.keys / f"{key.public.publisher}.key"

    def sign(self, tag: str, key: PrivateKey | None = None) -> Path:
        """`dativo plugin sign TAG --key ...`; returns the signature file."""
        key = key or self.acme
        assert main(["plugin", "sign", tag, "--key", str(self.key_file(key))]) == 0
        image_id = docker_cli("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
        return signatures_dir(self.path, image_id) / f"{key.key_id}.sig.json"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, session_dativo_home: Path) -> Home:
    path = tmp_path / "dativo-home"
    (path / "trust").mkdir(parents=True)
    shutil.copytree(session_dativo_home / "trust" / "keys", path / "trust" / "keys")
    if (session_dativo_home / "signatures").is_dir():
        shutil.copytree(session_dativo_home / "signatures", path / "signatures")
    session = load_trust(session_dativo_home).policy
    strict = Policy(version=1, publishers=session.publishers, allow_unsigned_local=False)
    body = yaml.safe_dump(strict.model_dump(mode="json"), sort_keys=False)
    policy_path(path).write_text(POLICY_HEADER + body)
    monkeypatch.setenv("DATIVO_HOME", str(path))
    keys = tmp_path / "keys"
    made = {}
    for name in ("acme", "other", "stranger"):
        key_path, _, _ = generate_key(name, keys)
        made[name] = load_private_key(key_path)
    add_trusted_key(made["acme"].public, publisher="acme", plugins=["acme/*"])
    add_trusted_key(made["other"].public, publisher="other", plugins=["other/*"])
    return Home(path, keys, made["acme"], made["other"], made["stranger"])


def job(tmp_path: Path, image: str, **reader: Any) -> Any:
    return parse_job(
        {
            "version": 1,
            "name": "signing",
            "source": {
                "reader": {
                    "type": "image",
                    "image": image,
                    "config": {"rows": 100, "columns": 3},
                    **reader,
                }
            },
            "target": {"writer": {"type": "builtin", "name": "null"}},
            "run": {"handshake_timeout": "60s"},
        },
        base_dir=tmp_path,
    )


def created_containers(client: Any, since: str, until: str) -> list[str]:
    """Names of containers this session's supervisors created between the two times."""
    events = client.events(
        since=since,
        until=until,
        decode=True,
        filters={"type": "container", "event": "create", "label": "org.dativo.managed=true"},
    )
    base = str(runtime_base()) + "/"
    probe = f"dativo-probe-{os.getpid()}-"
    names = []
    for event in events:
        attributes = event.get("Actor", {}).get("Attributes", {})
        name = attributes.get("name", "")
        if attributes.get(LABEL_RUN_DIR, "").startswith(base) or name.startswith(probe):
            names.append(name)
    return names


@contextlib.contextmanager
def nothing_starts(client: Any) -> Iterator[None]:
    since = f"{time.time():.9f}"
    yield
    until = f"{time.time():.9f}"
    created = created_containers(client, since, until)
    assert created == [], f"containers were created before the refusal: {created}"


def refused(
    client: Any, config: Any, *fragments: str, error: type[DativoError] = SignatureError
) -> DativoError:
    with nothing_starts(client), pytest.raises(error) as caught:
        run_job(config)
    text = str(caught.value)
    for fragment in fragments:
        assert fragment in text, text
    return caught.value


# -- the built-in images ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["files", "generate", "parquet", "null"])
def test_builtin_images_are_signed_by_the_local_builder(name: str) -> None:
    """`make images` signed every built-in with the builder key, trusted for `dativo/*`."""
    image = f"dativo/builtin-{name}:{__version__}"
    info = Engine().image(image)
    role = "reader" if name in ("files", "generate") else "writer"
    verified = verify_plugin(
        info, role=role, grants=Grants(), expected_name=f"dativo/{name}", reference=image
    )
    assert verified.signed
    assert verified.publisher == "dativo-local"
    assert verified.manifest is not None
    assert verified.manifest.version == __version__
    assert info.labels.get("org.dativo.builtin") == "true"
    assert info.entrypoint is not None
    assert info.entrypoint[:3] == ("python3", "-m", "dativo.host")
    assert not info.cmd
    assert info.repo_digests == ()


# -- the tamper suite ---------------------------------------------------------------------------


def test_unsigned_image(home: Home, tmp_path: Path, client: Any) -> None:
    tag = f"{PREFIX}unsigned:1"
    build(tag, manifest(), tmp_path / "ctx")
    error = refused(client, job(tmp_path, tag), f"image `{tag}`", "has no signature")
    assert isinstance(error, SignatureError)
    assert error.check == "unsigned"
    assert "dativo plugin sign" in str(error)


def test_signature_removed(home: Home, tmp_path: Path, client: Any) -> None:
    tag = f"{PREFIX}removed:1"
    build(tag, manifest(), tmp_path / "ctx")
    home.sign(tag).unlink()
    refused(client, job(tmp_path, tag), "has no signature")


def test_wrong_key(home: Home, tmp_path: Path, client: Any) -> None:
    tag = f"{PREFIX}wrong-key:1"
    build(tag, manifest(), tmp_path / "ctx")
    home.sign(tag, home.stranger)
    refused(
        client,
        job(tmp_path, tag),
        "has no valid signature",
        f"made with key `{home.stranger.key_id}`, which is not in the trust store",
    )


def test_key_not_trusted_for_that_plugin(home: Home, tmp_path: Path, client: Any) -> None:
    tag = f"{PREFIX}scope:1"
    build(tag, manifest(), tmp_path / "ctx")
    home.sign(tag, home.other)
    refused(
        client,
        job(tmp_path, tag),
        "belongs to publisher `other`",
        "allows to sign `other/*` only, not `acme/gen`",
    )


def test_corrupted_signature(home: Home, tmp_path: Path, client: Any) -> None:
    tag = f"{PREFIX}corrupt:1"
    build(tag, manifest(), tmp_path / "ctx")
    path = home.sign(tag)
    doc = json.loads(path.read_text())
    raw = bytearray(base64.b64decode(doc["signature"]))
    raw[0] ^= 0x80
    doc["signature"] = base64.b64encode(bytes(raw)).decode()
    path.write_text(json.dumps(doc))
    refused(client, job(tmp_path, tag), "the signature does not verify with key", "altered")


def test_manifest_edited_after_signing(home: Home, tmp_path: Path, client: Any) -> None:
    tag = f"{PREFIX}edited:1"
    build(tag, manifest(), tmp_path / "ctx")
    signature = home.sign(tag)
    original = signature.read_bytes()
    # (a) The signed payload edited to declare more network: the signature no longer verifies.
    doc = json.loads(signature.read_text())
    payload = json.loads(base64.b64decode(doc["payload"]))
    payload["manifest"]["network"].append("evil.example.com:443")
    doc["payload"] = base64.b64encode(canonical_json(payload)).decode()
    signature.write_text(json.dumps(doc))
    refused(client, job(tmp_path, tag), "the signature does not verify")
    # (b) The label edited: that is a new image (the ID covers the labels), and the old
    #     signature copied next to it names the old ID.
    edited = manifest(network=["db.example.com:5432", "evil.example.com:443"])
    new_id = build(tag, edited, tmp_path / "ctx")
    copy = signatures_dir(home.path, new_id) / signature.name
    copy.parent.mkdir(parents=True)
    copy.write_bytes(original)
    refused(client, job(tmp_path, tag), "was made for image", "not this image")


def test_image_rebuilt_under_the_same_tag(home: Home, tmp_path: Path, client: Any) -> None:
    tag = f"{PREFIX}rebuilt:1"
    first = build(tag, manifest(), tmp_path / "ctx", marker="original")
    home.sign(tag)
    with nothing_starts(client):
        verified = verify_plugin(Engine().image(tag), role="reader", grants=Grants())
    assert verified.signed
    assert verified.image_id == first
    second = build(tag, manifest(), tmp_path / "ctx", marker="changed file")
    assert second != first
    refused(client, job(tmp_path, tag), f"({second[:19]}…) has no signature")


def test_signature_copied_from_another_image(home: Home, tmp_path: Path, client: Any) -> None:
    source, target = f"{PREFIX}graft-source:1", f"{PREFIX}graft-target:1"
    build(source, manifest(), tmp_path / "a")
    target_id = build(target, manifest(version="1.0.1"), tmp_path / "b")
    signature = home.sign(source)
    copy = signatures_dir(home.path, target_id) / signature.name
    copy.parent.mkdir(parents=True)
    shutil.copy(signature, copy)
    refused(client, job(tmp_path, target), "was made for image", "copied from another image")


def test_expired_key(home: Home, tmp_path: Path, client: Any) -> None:
    tag = f"{PREFIX}expired:1"
    build(tag, manifest(), tmp_path / "ctx")
    home.sign(tag)
    stored = home.path / "trust" / "keys" / f"{home.acme.key_id}.pub.json"
    data = json.loads(stored.read_text())
    data["expires_at"] = "2021-06-30T00:00:00Z"
    stored.write_text(json.dumps(data))
    refused(client, job(tmp_path, tag), "expired at 2021-06-30T00:00:00Z")


def test_revoked_key(home: Home, tmp_path: Path, client: Any) -> None:
    tag = f"{PREFIX}revoked:1"
    build(tag, manifest(), tmp_path / "ctx")
    home.sign(tag)
    assert main(["trust", "revoke", home.acme.key_id]) == 0
    refused(client, job(tmp_path, tag), f"key `{home.acme.key_id}` of publisher `acme` is revoked")


def test_older_version_than_one_already_run(home: Home, tmp_path: Path, client: Any) -> None:
    new, old = f"{PREFIX}rollback:2.0.0", f"{PREFIX}rollback:1.0.0"
    build(new, manifest(version="2.0.0"), tmp_path / "new", runnable=True)
    home.sign(new)
    report = run_job(job(tmp_path, new))
    assert report.status == "succeeded"
    assert report.signed is True
    reader = report.plugins["reader"]
    assert reader["manifest"] == {"name": "acme/gen", "version": "2.0.0"}
    assert (reader["publisher"], reader["key_id"]) == ("acme", home.acme.key_id)
    assert load_trust().seen["acme/gen"] == "2.0.0"
    build(old, manifest(version="1.0.0"), tmp_path / "old")
    home.sign(old)
    refused(
        client,
        job(tmp_path, old),
        "`acme/gen` 1.0.0 is older than version 2.0.0, already run on this machine",
    )


def test_job_granting_more_network_than_declared(home: Home, tmp_path: Path, client: Any) -> None:
    tag = f"{PREFIX}network:1"
    build(tag, manifest(), tmp_path / "ctx")
    home.sign(tag)
    error = refused(
        client,
        job(tmp_path, tag, network=["db.example.com:5432", "exfil.example.net:443"]),
        "`source.reader.network` grants `exfil.example.net:443`",
        "it declares: `db.example.com:5432`",
        error=ConfigError,
    )
    assert isinstance(error, ConfigError)
    assert error.field == "source.reader.network"


def test_malformed_trust_store_or_policy(home: Home, tmp_path: Path, client: Any) -> None:
    tag = f"{PREFIX}malformed:1"
    build(tag, manifest(), tmp_path / "ctx")
    home.sign(tag)
    policy = policy_path(home.path)
    good = policy.read_text()
    policy.write_text(good + "allow_unsigned_local: yes please\n")
    refused(client, job(tmp_path, tag), str(policy), "allow_unsigned_local", error=ConfigError)
    policy.write_text(good)
    stored = home.path / "trust" / "keys" / f"{home.acme.key_id}.pub.json"
    stored.write_text(stored.read_text().replace('"publisher"', '"publisher_name"'))
    refused(client, job(tmp_path, tag), str(stored), "unknown field", error=ConfigError)


def test_refusal_through_the_cli(
    home: Home, tmp_path: Path, client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    tag = f"{PREFIX}cli:1"
    build(tag, manifest(), tmp_path / "ctx")
    path = tmp_path / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "name": "signing",
                "source": {"reader": {"type": "image", "image": tag}},
                "target": {"writer": {"type": "builtin", "name": "null"}},
            }
        )
    )
    with nothing_starts(client):
        assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"reader plugin `image:{tag}`: image `{tag}`" in err
    assert "has no signature" in err
    assert "fix: sign it with `dativo plugin sign" in err
    assert "Traceback" not in err


# -- bundles ------------------------------------------------------------------------------------


def rewrite_member(bundle: Path, name: str, change: Any) -> None:
    with tarfile.open(bundle) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]
    with tarfile.open(bundle, "w") as tar:
        for member, data in members:
            new = change(data) if member.name == name else data
            member.size = len(new)
            tar.addfile(member, io.BytesIO(new))


def in_engine(reference: str) -> bool:
    return docker_cli("image", "inspect", reference).returncode == 0


def test_tampered_bundle_is_refused_on_import(
    home: Home, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tag = f"{PREFIX}bundle:1"
    image_id = build(tag, manifest(), tmp_path / "ctx")
    home.sign(tag)
    bundle = tmp_path / "plugin.dativo"
    assert main(["plugin", "export", tag, "-o", str(bundle)]) == 0
    good = bundle.read_bytes()
    docker_cli("image", "rm", "--force", image_id)
    assert not in_engine(image_id)

    # A flipped bit in the image archive.
    def flip(data: bytes) -> bytes:
        edited = bytearray(data)
        edited[len(edited) // 2] ^= 1
        return bytes(edited)

    rewrite_member(bundle, "image.tar", flip)
    assert main(["plugin", "import", str(bundle)]) == 1
    err = capsys.readouterr().err
    assert "the bundle member `image.tar` was altered" in err
    assert "nothing was loaded" in err
    assert not in_engine(image_id)

    # A signature by a key the policy does not trust for the plugin.
    bundle.write_bytes(good)
    revoke_key(home.acme.key_id)
    assert main(["plugin", "import", str(bundle)]) == 1
    assert f"key `{home.acme.key_id}` of publisher `acme` is revoked" in capsys.readouterr().err
    assert not in_engine(image_id)


def test_build_sign_export_wipe_import_run(
    home: Home, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tag = f"{PREFIX}e2e:1.0.0"
    image_id = build(tag, manifest(name="acme/e2e"), tmp_path / "ctx", runnable=True)
    home.sign(tag)
    bundle = tmp_path / "e2e.dativo"
    assert main(["plugin", "export", tag, "-o", str(bundle)]) == 0
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
    assert names == ["index.json", "image.tar", f"signatures/{home.acme.key_id}.sig.json"]

    # Wipe: the image and its local signatures are gone.
    assert docker_cli("image", "rm", "--force", tag, image_id).returncode == 0
    shutil.rmtree(signatures_dir(home.path, image_id))
    assert not in_engine(image_id)

    capsys.readouterr()
    assert main(["plugin", "import", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert f"imported acme/e2e 1.0.0 (reader), image {image_id}, signed by acme" in out
    assert in_engine(tag)

    assert main(["plugin", "inspect", tag, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["image_id"] == image_id
    assert shown["status"] == "valid"
    assert shown["manifest"]["name"] == "acme/e2e"

    report = run_job(job(tmp_path, tag))
    assert report.status == "succeeded"
    assert report.rows == 100
    assert report.plugins["reader"]["image"] == image_id
    assert report.plugins["reader"]["signed"] is True
    assert report.plugins["writer"]["manifest"]["name"] == "dativo/null"


# -- cost ---------------------------------------------------------------------------------------


def test_verification_is_small_next_to_container_start(home: Home) -> None:
    image = f"dativo/builtin-generate:{__version__}"
    engine = Engine()
    grants = Grants(field_path="source.reader")
    verify_only, with_inspect = [], []
    for _ in range(20):
        started = time.perf_counter()
        info = engine.image(image)
        inspected = time.perf_counter()
        verified = verify_plugin(
            info, role="reader", grants=grants, expected_name="dativo/generate"
        )
        done = time.perf_counter()
        assert verified.signed
        verify_only.append(done - inspected)
        with_inspect.append(done - started)
    starts = []
    for _ in range(5):
        started = time.perf_counter()
        proc = docker_cli("run", "--rm", "--network", "none", "--entrypoint", "true", image)
        starts.append(time.perf_counter() - started)
        assert proc.returncode == 0, proc.stderr
    verify_ms = statistics.median(verify_only) * 1000
    inspect_ms = statistics.median(with_inspect) * 1000
    start_ms = statistics.median(starts) * 1000
    print(
        f"\nsignature verification (median of 20): {verify_ms:.2f} ms; with the image inspect: "
        f"{inspect_ms:.2f} ms; `docker run --rm IMAGE true` (median of 5): {start_ms:.0f} ms; "
        f"ratio {inspect_ms / start_ms:.1%}"
    )
    assert inspect_ms < start_ms / 10
