"""Iceberg and Parquet-on-S3 targets end to end, with real plugin containers.

- local: `generate` -> `parquet` writer -> Iceberg (SQLite catalog, local warehouse), read back
  by pyiceberg and by pyarrow from the data files alone;
- S3: the same into an Iceberg table and a Parquet prefix on a local moto server (the S3 image
  of `make services`), with credentials from the environment that reach neither the writer
  container nor the report;
- PostgreSQL as the catalog;
- fault injection: an incremental job run 30+ times, each run SIGKILLed (supervisor or plugin)
  at a random point, then one clean run: every source row is in the table exactly once.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import docker
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.table import Table
from tests.services import s3_service

from dativo.config import load_job, parse_job
from dativo.connectors.generate import generate_table
from dativo.sandbox import LABEL_ROLE, LABEL_RUN_DIR, runtime_base
from dativo.state import StateStore
from dativo.supervisor import RunOptions, run_job

pytestmark = pytest.mark.docker

MANAGED = {"label": "org.dativo.managed=true"}
SECRET_KEY = "dativo-test-secret-never-shown"


@pytest.fixture
def client(docker_engine: str) -> Iterator[Any]:
    engine = docker.from_env()
    yield engine
    engine.close()


@pytest.fixture(autouse=True)
def no_leftovers(client: Any) -> Iterator[None]:
    yield
    assert own_containers(client) == [], "plugin containers left behind"
    assert list(runtime_base().iterdir()) == [], "run directories left behind"


def own_containers(client: Any) -> list[Any]:
    base = str(runtime_base())
    return [
        c
        for c in client.containers.list(all=True, filters=MANAGED)
        if c.labels.get(LABEL_RUN_DIR, "").startswith(base + "/")
    ]


def job_data(target: dict[str, Any], reader: dict[str, Any], **extra: Any) -> dict[str, Any]:
    small = {"cpus": 1, "memory": "512MiB"}
    return {
        "version": 1,
        "name": "lake",
        "source": {"reader": {**reader, "resources": small}, **extra.get("source", {})},
        "target": {
            "writer": {
                "type": "builtin",
                "name": "parquet",
                "config": {"target_file_size": "1MiB"},
                "resources": small,
            },
            **target,
        },
        "run": {"handshake_timeout": "60s", "batch_size": 20_000},
    }


def generate(rows: int, columns: int) -> dict[str, Any]:
    return {"type": "builtin", "name": "generate", "config": {"rows": rows, "columns": columns}}


def local_path(location: str) -> str:
    return urlparse(location).path if location.startswith("file:") else location


def data_files(tbl: Table) -> list[str]:
    return tbl.inspect.files().column("file_path").to_pylist()


def check_manifests(tbl: Table, rows: int) -> None:
    """The metadata is consistent: the current snapshot's manifests list the data files and
    their row counts add up, and the schema is the table's."""
    snapshot = tbl.current_snapshot()
    assert snapshot is not None
    manifests = tbl.inspect.manifests()
    assert manifests.num_rows >= 1
    files = tbl.inspect.files()
    assert sum(files.column("record_count").to_pylist()) == rows
    assert int(snapshot.summary["total-records"]) == rows
    assert int(snapshot.summary["total-data-files"]) == files.num_rows


# -- local ----------------------------------------------------------------------------------


def test_local_iceberg_reads_back_identically(tmp_path: Path) -> None:
    rows, columns = 120_000, 10
    job = parse_job(
        job_data({"format": "iceberg", "iceberg": {"table": "orders"}}, generate(rows, columns)),
        base_dir=tmp_path,
    )
    report = run_job(job)
    assert report.status == "succeeded"
    assert report.rows == rows
    assert report.commit is not None
    assert report.commit["committed"] is True
    assert report.commit_seconds is not None
    assert report.commit_seconds < 30
    expected = generate_table(rows, columns, seed=0)
    catalog = SqlCatalog("dativo", uri=f"sqlite:///{tmp_path}/.dativo/catalog.db")
    tbl = catalog.load_table("default.orders")
    assert [f.name for f in tbl.schema().fields] == expected.schema.names
    by_iceberg = tbl.scan().to_arrow().sort_by("id")
    assert by_iceberg.equals(expected)
    paths = [local_path(p) for p in data_files(tbl)]
    assert len(paths) >= 2  # rolled at 1MiB
    assert all(
        p.startswith(str(tmp_path / "warehouse" / "default" / "orders" / "data")) for p in paths
    )
    by_pyarrow = pa.concat_tables(pq.read_table(p) for p in paths).sort_by("id")
    assert by_pyarrow.equals(expected)
    check_manifests(tbl, rows)
    summary = tbl.current_snapshot().summary.additional_properties
    assert summary["dativo.run-id"] == report.run_id
    assert summary["dativo.cursor"] == "null"  # `generate` keeps no state
    assert not list((tmp_path / ".dativo" / "staging" / "lake" / ".dativo-staging").iterdir())


# -- S3 -------------------------------------------------------------------------------------


@pytest.fixture
def s3(docker_engine: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    import boto3
    from botocore.config import Config

    with s3_service(secret_key=SECRET_KEY) as service:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", service.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", service.secret_key)
        monkeypatch.setenv("AWS_REGION", service.region)
        monkeypatch.setenv("AWS_ENDPOINT_URL", service.endpoint_url)
        s3 = boto3.client(
            "s3", config=Config(s3={"addressing_style": "path"}), **service.client_kwargs()
        )
        s3.create_bucket(Bucket="lake")
        yield service, s3


def test_iceberg_and_parquet_on_s3(
    tmp_path: Path, s3: Any, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    service, boto = s3
    rows, columns = 60_000, 8
    expected = generate_table(rows, columns, seed=0)
    environments: list[list[str]] = []

    def inspect(process: Any) -> None:
        environments.append(client.api.inspect_container(process.container.id)["Config"]["Env"])

    caplog.set_level("DEBUG")
    # Iceberg: SQLite catalog here, warehouse on S3.
    iceberg = parse_job(
        job_data(
            {
                "format": "iceberg",
                "iceberg": {"table": "orders", "warehouse": "s3://lake/warehouse"},
            },
            generate(rows, columns),
        ),
        base_dir=tmp_path / "ice",
    )
    report = run_job(iceberg, RunOptions(on_start=inspect))
    assert report.status == "succeeded"
    catalog = SqlCatalog(
        "dativo",
        uri=f"sqlite:///{tmp_path}/ice/.dativo/catalog.db",
        **{"s3.endpoint": service.endpoint_url, "s3.region": service.region},
    )
    tbl = catalog.load_table("default.orders")
    assert tbl.location().startswith("s3://lake/warehouse/")
    assert tbl.scan().to_arrow().sort_by("id").equals(expected)
    fs = pafs.S3FileSystem(
        access_key=service.access_key,
        secret_key=service.secret_key,
        endpoint_override=urlparse(service.endpoint_url).netloc,
        scheme="http",
        region=service.region,
    )
    paths = [p.removeprefix("s3://") for p in data_files(tbl)]
    by_pyarrow = pa.concat_tables(pq.read_table(p, filesystem=fs) for p in paths).sort_by("id")
    assert by_pyarrow.equals(expected)
    check_manifests(tbl, rows)
    keys = [o["Key"] for o in boto.list_objects_v2(Bucket="lake", Prefix="warehouse/")["Contents"]]
    assert any(k.endswith(".metadata.json") for k in keys)
    assert sum(k.endswith(".parquet") for k in keys) == len(paths)

    # Parquet on S3: the supervisor uploads the verified files.
    parquet = parse_job(
        job_data({"path": "s3://lake/orders"}, generate(rows, columns)), base_dir=tmp_path / "pq"
    )
    second = run_job(parquet, RunOptions(on_start=inspect))
    assert second.status == "succeeded"
    assert second.commit == {
        "format": "parquet",
        "location": "s3://lake/orders",
        "objects": len(second.files),
    }
    listed = boto.list_objects_v2(Bucket="lake", Prefix="orders/")["Contents"]
    assert sorted(o["Key"] for o in listed) == sorted(f"orders/{f['path']}" for f in second.files)
    uploaded = pa.concat_tables(
        pq.read_table(f"lake/orders/{f['path']}", filesystem=fs) for f in second.files
    ).sort_by("id")
    assert uploaded.equals(expected)
    assert not list(
        (tmp_path / "pq" / ".dativo" / "staging" / "lake" / ".dativo-staging").iterdir()
    )

    # Credentials: never in a plugin container, the reports, the logs or the run history.
    assert len(environments) == 4
    for env in environments:
        assert not [e for e in env if e.startswith("AWS_")], env
    text = json.dumps(report.to_json()) + json.dumps(second.to_json()) + caplog.text
    text += (tmp_path / "ice" / ".dativo" / "state.db").read_bytes().decode("latin-1")
    assert SECRET_KEY not in text


def test_postgres_catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.services import postgres_service  # psycopg: a VENV_EXTRAS package, never skipped

    with postgres_service(password="pg-secret-never-shown") as pg:
        monkeypatch.setenv("LAKE_PG_PASSWORD", pg.password)
        uri = f"postgresql+psycopg://{pg.user}:${{LAKE_PG_PASSWORD}}@{pg.host}:{pg.port}/{pg.database}"
        job = parse_job(
            job_data(
                {"format": "iceberg", "iceberg": {"table": "orders", "catalog": {"uri": uri}}},
                generate(10_000, 4),
            ),
            base_dir=tmp_path,
        )
        report = run_job(job)
        assert report.status == "succeeded"
        assert "pg-secret-never-shown" not in json.dumps(report.to_json())
        catalog = SqlCatalog("dativo", uri=uri.replace("${LAKE_PG_PASSWORD}", pg.password))
        tbl = catalog.load_table("default.orders")
        assert tbl.scan().to_arrow().sort_by("id").equals(generate_table(10_000, 4, seed=0))
        catalog.engine.dispose()


# -- fault injection --------------------------------------------------------------------------

ROWS_PER_FILE = 300
ITERATIONS = 32

# Runs `dativo run` with a hook that SIGKILLs the supervisor at an exact step of the commit
# (`DATIVO_TEST_KILL_AT`): test-only, the supervisor itself has no such switch.
LAUNCHER = r"""
import os, signal, sys
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
at = os.environ.get("DATIVO_TEST_KILL_AT")
if at == "state-save":  # after the Iceberg commit, before the state is saved
    from dativo.state import StateStore
    StateStore.save = die
elif at == "before-commit":  # after the journal, before the catalog commit
    import dativo.lake._iceberg as iceberg
    iceberg.IcebergCommitter.commit = die
elif at == "after-move":  # the files are in the table's data location, not yet committed
    import dativo.lake._iceberg as iceberg
    place = iceberg.IcebergCommitter._place
    def place_then_die(*args, **kwargs):
        place(*args, **kwargs)
        die()
    iceberg.IcebergCommitter._place = place_then_die
from dativo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def write_fault_job(root: Path) -> Path:
    data = {
        "version": 1,
        "name": "faults",
        "source": {
            "files": "in",
            "reader": {
                "type": "builtin",
                "name": "files",
                "config": {
                    "paths": ["*.csv"],
                    "incremental": True,
                    "schema": {"id": "int64", "name": "string"},
                },
                "resources": {"cpus": 0.5, "memory": "256MiB"},
            },
        },
        "target": {
            "format": "iceberg",
            "iceberg": {"table": "events"},
            "writer": {
                "type": "builtin",
                "name": "parquet",
                "resources": {"cpus": 0.5, "memory": "256MiB"},
            },
        },
        "run": {"handshake_timeout": "60s"},
    }
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    (root / "in").mkdir()
    return path


def add_file(root: Path, index: int) -> None:
    start = index * ROWS_PER_FILE
    lines = ["id,name", *(f"{i},event-{i}" for i in range(start, start + ROWS_PER_FILE))]
    (root / "in" / f"events-{index:03d}.csv").write_text("\n".join(lines) + "\n")


def start_run(job: Path, kill_at: str | None = None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.pop("DATIVO_TEST_KILL_AT", None)
    if kill_at is not None:
        env["DATIVO_TEST_KILL_AT"] = kill_at
    logs = job.parent / "logs"
    logs.mkdir(exist_ok=True)
    with open(logs / f"run-{len(list(logs.iterdir())):03d}.txt", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, "run", str(job), "--quiet"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def last_log(job: Path) -> str:
    return sorted((job.parent / "logs").iterdir())[-1].read_text()[-3000:]


def running_plugin(client: Any, role: str) -> str | None:
    """The id of this session's running plugin container of `role`, if any."""
    base = str(runtime_base()) + "/"
    for info in client.api.containers(filters={**MANAGED, "status": "running"}):
        labels = info.get("Labels") or {}
        if labels.get(LABEL_RUN_DIR, "").startswith(base) and labels.get(LABEL_ROLE) == role:
            return str(info["Id"])
    return None


def kill_plugin(client: Any, role: str) -> bool:
    """SIGKILL the running plugin container of `role`, if there still is one."""
    container = running_plugin(client, role)
    if container is None:
        return False
    try:
        client.api.kill(container, signal="SIGKILL")
    except docker.errors.APIError:  # it exited or was removed meanwhile
        return False
    return True


@pytest.mark.slow
def test_sigkill_at_random_points_never_loses_or_duplicates_a_row(
    tmp_path: Path, client: Any
) -> None:
    seed = int(os.environ.get("DATIVO_FAULT_SEED", time.time()))
    rng = random.Random(seed)
    job_path = write_fault_job(tmp_path)
    # A clean first run tells how long one run takes here.
    add_file(tmp_path, 0)
    started = time.monotonic()
    first = start_run(job_path)
    assert first.wait(timeout=180) == 0, last_log(job_path)
    duration = time.monotonic() - started
    outcomes: list[str] = []
    targeted = ["state-save", "before-commit", "after-move"]
    for index in range(1, ITERATIONS + 1):
        add_file(tmp_path, index)
        if index % 6 == 0:
            kill_at = targeted[(index // 6) % len(targeted)]
            proc = start_run(job_path, kill_at)
            code = proc.wait(timeout=180)
            outcomes.append(f"{index}:{kill_at}:{code}")
            continue
        # The supervisor: anywhere from its start to past its usual end (start-up, recovery,
        # stream, commit). A plugin: once its container runs, within its life.
        victim = rng.choice(["supervisor", "supervisor", "reader", "writer"])
        proc = start_run(job_path)
        killed = False
        if victim == "supervisor":
            delay = rng.uniform(0.0, duration * 1.1)
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.02)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
        else:
            delay = rng.uniform(0.0, 1.5)
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                if running_plugin(client, victim):
                    time.sleep(delay)
                    killed = kill_plugin(client, victim)
                    break
                time.sleep(0.02)
        code = proc.wait(timeout=180)
        outcomes.append(f"{index}:{victim}@{delay:.2f}s:{'killed' if killed else 'missed'}:{code}")
    # One clean run: it recovers whatever the last kill left, and reads what is still unread.
    final = start_run(job_path)
    assert final.wait(timeout=300) == 0, f"seed {seed}: {last_log(job_path)}"

    job = load_job(job_path)
    catalog = SqlCatalog("dativo", uri=job.iceberg_catalog_uri or "")
    tbl = catalog.load_table("default.events")
    ids = tbl.scan(selected_fields=("id",)).to_arrow().column("id")
    expected = (ITERATIONS + 1) * ROWS_PER_FILE
    context = f"seed {seed}; runs: {outcomes}"
    assert len(ids) == expected, context
    assert pc.count_distinct(ids).as_py() == expected, context
    assert sorted(ids.to_pylist()) == list(range(expected)), context
    # The data files alone agree, and the state covers every file.
    from_files = pa.concat_tables(
        pq.read_table(local_path(p), columns=["id"]) for p in data_files(tbl)
    )
    assert from_files.num_rows == expected, context
    state = StateStore(job.state_path).get("faults")
    assert state is not None
    assert len(state["files"]) == ITERATIONS + 1, context
    staging = tmp_path / ".dativo" / "staging" / "faults" / ".dativo-staging"
    assert list(staging.iterdir()) == [], f"staging left behind: {list(staging.iterdir())}"
    runs = {s.summary.additional_properties.get("dativo.run-id") for s in tbl.metadata.snapshots}
    assert len(runs) == len(tbl.metadata.snapshots), "one snapshot per committing run"
    killed = sum("killed" in o or o.split(":")[1] in targeted for o in outcomes)
    assert killed >= ITERATIONS // 2, context
    print(f"fault injection, seed {seed}: {killed} of {ITERATIONS} runs killed; {outcomes}")
