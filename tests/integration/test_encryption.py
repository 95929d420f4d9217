"""Encrypted output through real containers: the built-in `files` reader and `parquet` writer
in their hardened containers, the key broker on the writer's socket directory, the key file in
the supervisor only. Needs the built-in images (`make images`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import docker
import pyarrow.parquet as pq
import pytest
from tests.unit.keys.helpers import SECRET_VALUES, all_bytes, encrypted_job, key_file, write_source

from dativo.keys import KeyServiceError, key_service_for
from dativo.keys._file import revoke_version
from dativo.keys._parquet import read_encrypted
from dativo.sandbox import LABEL_RUN_DIR, runtime_base
from dativo.supervisor import RunOptions, run_job
from dativo.supervisor._audit import AUDIT_FILE, AuditLog

pytestmark = pytest.mark.docker

MANAGED = {"label": "org.dativo.managed=true"}


@pytest.fixture
def client(docker_engine: str) -> Any:
    return docker.from_env()


@pytest.fixture(autouse=True)
def no_leftovers(client: Any) -> Any:
    yield
    base = str(runtime_base())
    found = client.api.containers(all=True, filters=MANAGED)
    own = [
        c["Names"][0]
        for c in found
        if (c.get("Labels") or {}).get(LABEL_RUN_DIR, "").startswith(base + "/")
    ]
    assert own == [], f"containers left behind: {own}"
    assert list(runtime_base().iterdir()) == [], "run directories left behind"


def test_round_trip_through_containers_with_no_plaintext_and_no_key_in_the_writer(
    tmp_path: Path, client: Any
) -> None:
    source = write_source(tmp_path)
    keys = key_file(tmp_path)
    job = encrypted_job(tmp_path, {"type": "file", "path": str(keys)})
    seen: dict[str, dict[str, Any]] = {}

    def inspect(process: Any) -> None:
        seen[process.launch.role] = client.api.inspect_container(process.container.id)

    report = run_job(job, RunOptions(on_start=inspect))
    assert report.sandboxed
    out = tmp_path / "out"
    files = sorted(p for p in out.glob("*.parquet"))
    assert len(files) == 1
    # Nothing readable without keys, no known value anywhere in the written bytes.
    with pytest.raises(OSError, match="no decryption found"):
        pq.read_table(files[0])
    for path, data in all_bytes(out):
        for value in SECRET_VALUES:
            assert value.encode() not in data, f"`{value}` in plain text in {path}"
    assert read_encrypted(str(files[0]), key_service_for(job)).equals(source)
    assert AuditLog(out).verify().ok
    assert report.audit[0]["file"] == files[0].name
    assert (out / AUDIT_FILE).is_file()
    # The writer container got a broker socket, never the key file or its bytes.
    writer = seen["writer"]
    sources = [m.get("Source", "") for m in writer.get("Mounts", [])]
    assert not any(str(keys.parent) in s for s in sources), sources
    environment = json.dumps(writer["Config"].get("Env") or [])
    key_bytes = json.loads(keys.read_text())
    for entry in key_bytes["keys"].values():
        for material in entry["versions"].values():
            assert material not in environment
            assert material not in json.dumps(writer)
    assert report.encryption is not None
    broker = report.encryption["broker"]
    assert broker["refused"] == 0
    assert {w["key_id"] for w in broker["wrapped"]} == {"data", "pii"}


def test_a_revoked_key_fails_the_containerised_run_with_nothing_published(tmp_path: Path) -> None:
    write_source(tmp_path)
    keys = key_file(tmp_path)
    revoke_version(keys, "pii", 1)
    job = encrypted_job(tmp_path, {"type": "file", "path": str(keys)})
    with pytest.raises(KeyServiceError, match="key `pii`: version 1 is revoked"):
        run_job(job)
    out = tmp_path / "out"
    assert list(out.glob("*.parquet")) == []
    assert not (out / AUDIT_FILE).exists()
