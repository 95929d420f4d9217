"""The test-service images (`make services`) work, started the way tests start them.

A real PostgreSQL (tables, rows, password auth, reachable from another container on the services
network) and moto's server (an S3 bucket and object; a KMS key that encrypts, decrypts and makes
data keys), each through tests/services.py; every container is gone afterwards, also when a
service fails to start.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import uuid
from types import ModuleType

import pytest
from tests.services import (
    LABEL,
    LABEL_OWNER,
    ServiceError,
    postgres_service,
    reap_orphans,
    s3_service,
    service_image,
)

pytestmark = pytest.mark.docker


def docker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def require(module: str) -> ModuleType:
    """A client library of the tests; missing is a failure (`make venv` installs it)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"{module} is not installed: run `make venv` (VENV_EXTRAS)", pytrace=False)


@pytest.fixture(scope="module")
def images(docker_engine: str) -> dict[str, str]:
    """The service images; missing ones fail the test (`make services` builds them)."""
    try:
        return {name: service_image(name) for name in ("postgres", "s3")}
    except ServiceError as exc:
        pytest.fail(str(exc), pytrace=False)


def container_exists(container_id: str) -> bool:
    return docker("container", "inspect", container_id).returncode == 0


def inspect_container(container_id: str) -> dict[str, object]:
    proc = docker("container", "inspect", container_id)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)[0]
    assert isinstance(data, dict)
    return data


def assert_running_as_a_service(container_id: str, port: int, user: str) -> None:
    """Labelled, published on 127.0.0.1 only, not root."""
    data = inspect_container(container_id)
    config = data["Config"]
    assert isinstance(config, dict)
    assert config["Labels"][LABEL] == "true"
    assert config["User"] == user
    network = data["NetworkSettings"]
    assert isinstance(network, dict)
    bindings = network["Ports"][f"{port}/tcp"]
    assert bindings, network["Ports"]
    assert {b["HostIp"] for b in bindings} == {"127.0.0.1"}


def test_postgres_tables_rows_and_password_auth(images: dict[str, str]) -> None:
    psycopg = require("psycopg")
    with postgres_service() as pg:
        assert_running_as_a_service(pg.container_id, 5432, "postgres")
        with psycopg.connect(pg.dsn) as conn:
            conn.execute("CREATE TABLE events (id int PRIMARY KEY, name text NOT NULL, at date)")
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO events VALUES (%s, %s, %s)",
                    [(i, f"event-{i}", f"2026-01-{i:02d}") for i in range(1, 21)],
                )
            conn.commit()
            rows = conn.execute("SELECT id, name FROM events WHERE id <= 3 ORDER BY id").fetchall()
            assert rows == [(1, "event-1"), (2, "event-2"), (3, "event-3")]
            assert conn.execute("SELECT count(*) FROM events").fetchone() == (20,)
            facts = conn.execute(
                "SELECT current_user, current_database(), current_setting('server_version_num'),"
                " current_setting('fsync')"
            ).fetchone()
            assert facts is not None
            assert facts[:2] == (pg.user, pg.database)
            assert facts[2].startswith("15")
            assert facts[3] == "off"  # tuned for tests

        # Password authentication is real (SCRAM over TCP).
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(
                host=pg.host, port=pg.port, user=pg.user, password="wrong", dbname=pg.database
            ).close()

        # Another container on the services network reaches it at container_ip:5432.
        proc = docker(
            "run", "--rm", "--pull", "never", "--network", pg.network,
            "--label", f"{LABEL}=true", "--entrypoint", "psql", images["postgres"],
            pg.container_dsn, "-Atc", "SELECT count(*) FROM events",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "20"
        container_id = pg.container_id
    assert not container_exists(container_id)


def test_postgres_custom_credentials(images: dict[str, str]) -> None:
    psycopg = require("psycopg")
    with postgres_service(user="reader", password='it\'s "quoted"', database="shop") as pg:
        assert "shop" in pg.dsn
        with psycopg.connect(pg.dsn) as conn:
            assert conn.execute("SELECT current_user, current_database()").fetchone() == (
                "reader",
                "shop",
            )
        container_id = pg.container_id
    assert not container_exists(container_id)


def test_s3_bucket_object_and_kms_key(images: dict[str, str]) -> None:
    boto3 = require("boto3")
    botocore_config = require("botocore.config")
    with s3_service() as svc:
        assert_running_as_a_service(svc.container_id, 5000, "65534:65534")
        s3 = boto3.client(
            "s3",
            config=botocore_config.Config(s3={"addressing_style": "path"}),
            **svc.client_kwargs(),
        )
        s3.create_bucket(Bucket="warehouse")
        body = os.urandom(1 << 20)
        s3.put_object(Bucket="warehouse", Key="tables/t1/part-0.parquet", Body=body)
        got = s3.get_object(Bucket="warehouse", Key="tables/t1/part-0.parquet")
        assert got["Body"].read() == body
        listed = s3.list_objects_v2(Bucket="warehouse", Prefix="tables/")
        assert [o["Key"] for o in listed["Contents"]] == ["tables/t1/part-0.parquet"]

        kms = boto3.client("kms", **svc.client_kwargs())
        key_id = kms.create_key(Description="dativo test key")["KeyMetadata"]["KeyId"]
        secret = b"client-side encryption needs a real KMS round trip"
        blob = kms.encrypt(KeyId=key_id, Plaintext=secret)["CiphertextBlob"]
        assert secret not in blob
        decrypted = kms.decrypt(CiphertextBlob=blob)
        assert decrypted["Plaintext"] == secret
        assert decrypted["KeyId"].endswith(key_id)
        data_key = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256")
        assert len(data_key["Plaintext"]) == 32
        assert (
            kms.decrypt(CiphertextBlob=data_key["CiphertextBlob"])["Plaintext"]
            == (data_key["Plaintext"])
        )
        container_id = svc.container_id
    assert not container_exists(container_id)


def test_a_service_that_fails_to_start_is_reported_and_removed(images: dict[str, str]) -> None:
    before = set(docker("ps", "-aq", "--filter", f"label={LABEL}=true").stdout.split())
    # The entrypoint refuses a password of two lines: the container exits at once.
    with pytest.raises(ServiceError, match="one line each"), postgres_service(password="a\nb"):
        pass
    after = set(docker("ps", "-aq", "--filter", f"label={LABEL}=true").stdout.split())
    assert after <= before


def test_orphans_of_dead_processes_are_reaped(images: dict[str, str]) -> None:
    import docker as docker_py

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    dead_pid = int(gone.stdout)
    name = f"dativo-svc-orphan-{uuid.uuid4().hex[:8]}"
    labels = {LABEL: "true", LABEL_OWNER: f"{socket.gethostname()}:{dead_pid}"}
    mine = {LABEL: "true", LABEL_OWNER: f"{socket.gethostname()}:{os.getpid()}"}
    client = docker_py.from_env()
    try:
        orphan = client.containers.create(images["s3"], name=name, labels=labels)
        alive = client.containers.create(images["s3"], name=f"{name}-alive", labels=mine)
        try:
            assert name in reap_orphans(client)
            assert not container_exists(orphan.id)
            assert container_exists(alive.id)
        finally:
            alive.remove(force=True)
            if container_exists(orphan.id):
                orphan.remove(force=True)
    finally:
        client.close()
