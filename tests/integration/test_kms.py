"""The `kms` key service against a local KMS-compatible server (moto in server mode, the S3/KMS
image of `make services`), and an encrypted in-process run to an S3 prefix with KMS keys."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pyarrow.fs as pafs
import pytest
from tests.services import S3Service, s3_service
from tests.unit.keys.helpers import SECRET_VALUES, encrypted_job, write_source

from dativo.keys import KeyServiceError, format_wrapped, key_service_for, parse_wrapped
from dativo.keys._kms import KmsKeys
from dativo.keys._parquet import read_encrypted
from dativo.supervisor import RunOptions, run_job
from dativo.supervisor._audit import AUDIT_FILE, AuditLog

pytestmark = pytest.mark.docker


@pytest.fixture
def moto(docker_engine: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Service]:
    with s3_service() as service:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", service.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", service.secret_key)
        monkeypatch.setenv("AWS_REGION", service.region)
        monkeypatch.setenv("AWS_ENDPOINT_URL", service.endpoint_url)
        yield service


def kms_client(service: S3Service) -> Any:
    return boto3.client("kms", **service.client_kwargs())


def new_key(client: Any, alias: str | None = None) -> str:
    arn = str(client.create_key(Description="dativo test")["KeyMetadata"]["Arn"])
    if alias is not None:
        client.create_alias(AliasName=alias, TargetKeyId=arn)
    return arn


def test_wrap_unwrap_and_rotation_by_alias(moto: S3Service) -> None:
    client = kms_client(moto)
    first = new_key(client, "alias/dativo-pii")
    keys = KmsKeys(endpoint_url=moto.endpoint_url)
    assert keys.check("alias/dativo-pii").version == first
    old = keys.wrap("alias/dativo-pii", b"o" * 32)
    parsed = parse_wrapped(old, service="kms")
    assert (parsed.key_id, parsed.version) == ("alias/dativo-pii", first)
    assert keys.unwrap(old) == b"o" * 32
    # Rotate: the alias now names a new key; new wraps use it, old ones still unwrap.
    second = new_key(client)
    client.update_alias(AliasName="alias/dativo-pii", TargetKeyId=second)
    new = keys.wrap("alias/dativo-pii", b"n" * 32)
    assert parse_wrapped(new, service="kms").version == second
    assert keys.unwrap(new) == b"n" * 32
    assert keys.unwrap(old) == b"o" * 32
    keys.close()


def test_disabled_deleted_missing_and_wrong_keys_are_clear_errors(moto: S3Service) -> None:
    client = kms_client(moto)
    arn = new_key(client, "alias/revoking")
    other = new_key(client, "alias/other")
    keys = KmsKeys(endpoint_url=moto.endpoint_url)
    wrapped = keys.wrap("alias/revoking", b"r" * 32)
    # Wrong key: the wrapped key claims another KMS key wrapped it.
    parsed = parse_wrapped(wrapped, service="kms")
    forged = format_wrapped("kms", "alias/revoking", other, parsed.ciphertext)
    with pytest.raises(KeyServiceError, match="Decrypt failed") as info:
        keys.unwrap(forged)
    assert info.value.reason in ("wrong-key", "refused")
    # A modified ciphertext.
    flipped = bytearray(parsed.ciphertext)
    flipped[-1] ^= 1
    with pytest.raises(KeyServiceError, match="Decrypt failed"):
        keys.unwrap(format_wrapped("kms", "alias/revoking", arn, bytes(flipped)))
    # Disabled: nothing wraps or unwraps.
    key_id = arn.rsplit("/", 1)[1]
    client.disable_key(KeyId=key_id)
    with pytest.raises(KeyServiceError, match="key `alias/revoking`") as info:
        keys.check("alias/revoking")
    assert info.value.reason == "revoked"
    with pytest.raises(KeyServiceError) as info:
        keys.unwrap(wrapped)
    assert info.value.reason == "revoked"
    # Scheduled for deletion.
    client.enable_key(KeyId=key_id)
    assert keys.unwrap(wrapped) == b"r" * 32
    client.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
    with pytest.raises(KeyServiceError) as info:
        keys.check("alias/revoking")
    assert info.value.reason == "revoked"
    with pytest.raises(KeyServiceError, match="does not exist") as info:
        keys.check("alias/never-created")
    assert info.value.reason == "missing"
    keys.close()


def test_a_stopped_server_is_reported_as_unavailable(
    docker_engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "dativo-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "dativo-test-secret")
    with s3_service() as service:
        endpoint = service.endpoint_url
        client = kms_client(service)
        new_key(client, "alias/gone")
        keys = KmsKeys(region=service.region, endpoint_url=endpoint)
        assert keys.check("alias/gone").version
    with pytest.raises(KeyServiceError, match="cannot be reached") as info:
        keys.check("alias/gone")
    assert info.value.reason == "unavailable"


def test_an_encrypted_run_to_s3_with_kms_keys(tmp_path: Path, moto: S3Service) -> None:
    client = kms_client(moto)
    new_key(client, "alias/lake-data")
    new_key(client, "alias/lake-pii")
    boto3.client("s3", **moto.client_kwargs()).create_bucket(Bucket="lake")
    source = write_source(tmp_path)
    job = encrypted_job(
        tmp_path,
        {"type": "kms", "endpoint_url": moto.endpoint_url},
        target="s3://lake/people",
        footer_key="alias/lake-data",
        column_keys={"alias/lake-pii": ["email", "ssn"]},
    )
    report = run_job(job, RunOptions(in_process=True))
    assert len(report.audit) == 1
    assert report.audit[0]["columns"]["email"]["key_id"] == "alias/lake-pii"
    text = json.dumps(report.to_json())
    assert moto.secret_key not in text
    fs = pafs.S3FileSystem(
        access_key=moto.access_key,
        secret_key=moto.secret_key,
        region=moto.region,
        endpoint_override=moto.endpoint_url.split("://", 1)[1],
        scheme="http",
    )
    objects = fs.get_file_info(pafs.FileSelector("lake/people", recursive=True))
    names = sorted(info.path for info in objects if info.type == pafs.FileType.File)
    assert f"lake/people/{AUDIT_FILE}" in names
    local = tmp_path / "downloaded"
    local.mkdir()
    for name in names:
        with fs.open_input_stream(name) as stream:
            data = stream.read()
        assert not any(value.encode() in data for value in SECRET_VALUES), name
        (local / name.rsplit("/", 1)[1]).write_bytes(data)
    (parquet,) = local.glob("*.parquet")
    assert read_encrypted(str(parquet), key_service_for(job)).equals(source)
    assert AuditLog("s3://lake/people").verify().ok
