"""End-to-end runs with real containers: data arrives intact, failures publish nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import docker
import pyarrow.parquet as pq
import pytest
import yaml

from dativo.config import parse_job
from dativo.connectors.generate import csv_schema, generate_csv, generate_table
from dativo.errors import PluginError
from dativo.sandbox import LABEL_RUN_DIR, runtime_base
from dativo.state import StateStore
from dativo.supervisor import RunOptions, run_job

pytestmark = pytest.mark.docker

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "plugins"
MANAGED = {"label": "org.dativo.managed=true"}


@pytest.fixture
def client(docker_engine: str) -> Any:
    return docker.from_env()


@pytest.fixture(autouse=True)
def no_leftovers(client: Any) -> Any:
    """Every test must leave no container, run directory or staging directory behind."""
    yield
    leftover = own_containers(client)
    assert leftover == [], f"containers left behind: {leftover}"
    base = runtime_base()
    assert list(base.iterdir()) == [], f"run directories left in {base}"


def own_containers(client: Any, **filters: str) -> list[str]:
    """Names of this test session's supervisors' containers (not of others on the engine)."""
    base = str(runtime_base())
    found = client.api.containers(all=True, filters={**MANAGED, **filters})
    return sorted(
        c["Names"][0].lstrip("/")
        for c in found
        if (c.get("Labels") or {}).get(LABEL_RUN_DIR, "").startswith(base + "/")
    )


def fixture_plugin(name: str, config: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    spec = {"type": "python", "implementation": f"faulty:{name}", "path": str(FIXTURES)}
    spec["config"] = config or {}
    spec.update(extra)
    return spec


def job(tmp_path: Path, reader: dict[str, Any], writer: dict[str, Any], **extra: Any) -> Any:
    data: dict[str, Any] = {
        "version": 1,
        "name": "itest",
        "source": {"reader": reader},
        # The null writer stages nothing, so it gets no target directory to account for.
        "target": {"writer": writer}
        if writer.get("name") == "null"
        else {"path": "out", "writer": writer},
        "run": {"handshake_timeout": "60s"},
    }
    for key, value in extra.items():
        data.setdefault(key, {}).update(value)
    return parse_job(data, base_dir=tmp_path)


def published(target: Path) -> list[Path]:
    return sorted(p for p in target.rglob("*") if p.is_file() and ".dativo-staging" not in p.parts)


@pytest.mark.slow
def test_one_million_csv_rows_arrive_identical(tmp_path: Path) -> None:
    rows, columns = 1_000_000, 12
    (tmp_path / "in").mkdir()
    generate_csv(tmp_path / "in" / "orders.csv", rows=rows, columns=columns, seed=7)
    config = job(
        tmp_path,
        {
            "type": "builtin",
            "name": "files",
            "config": {"paths": ["*.csv"], "schema": csv_schema(columns)},
        },
        {"type": "builtin", "name": "parquet", "config": {"target_file_size": "16MiB"}},
        source={"files": "in"},
    )
    report = run_job(config)
    assert report.status == "succeeded"
    assert report.rows == rows
    files = published(tmp_path / "out")
    assert len(files) == len(report.files) >= 2  # rolled at the target size
    written = pq.read_table(tmp_path / "out").sort_by("id")
    expected = generate_table(rows, columns, seed=7)
    assert written.schema == expected.schema
    assert written.equals(expected)
    assert report.plugins["reader"]["exit_code"] == 0
    assert report.plugins["writer"]["exit_code"] == 0


def test_containers_are_hardened(tmp_path: Path, client: Any) -> None:
    seen: dict[str, dict[str, Any]] = {}

    def inspect(process: Any) -> None:
        seen[process.launch.role] = client.api.inspect_container(process.container.id)

    config = job(
        tmp_path,
        fixture_plugin(
            "SlowReader",
            {"batches": 3, "interval": 0.1},
            resources={"memory": "256MiB", "cpus": 0.5, "pids": 32},
        ),
        {"type": "builtin", "name": "parquet"},
    )
    run_job(config, RunOptions(on_start=inspect))
    assert set(seen) == {"reader", "writer"}
    for role, data in seen.items():
        host = data["HostConfig"]
        assert host["NetworkMode"] == "none"
        assert host["ReadonlyRootfs"] is True
        assert host["CapDrop"] == ["ALL"]
        assert not host["CapAdd"]
        assert host["Privileged"] is False
        assert "no-new-privileges:true" in host["SecurityOpt"]
        assert host["Init"] is True
        assert host["Memory"] == host["MemorySwap"] > 0
        assert host["NanoCpus"] > 0
        assert host["PidsLimit"] > 0
        assert host["LogConfig"]["Config"]["max-size"] == "1m"
        assert "/tmp" in host["Tmpfs"]
        assert host["PidMode"] in ("", "private")
        assert host["IpcMode"] == "private"
        assert not host.get("Devices")
        assert data["Config"]["User"] == "65534:65534"
        targets = sorted(m["Destination"] for m in data["Mounts"])
        if role == "reader":
            assert targets == ["/plugin", "/run/dativo"]
            assert host["Memory"] == 256 << 20
            assert host["NanoCpus"] == 500_000_000
            assert host["PidsLimit"] == 32
        else:
            assert targets == ["/data/out", "/run/dativo"]
        for mount in data["Mounts"]:
            assert mount["RW"] is (mount["Destination"] == "/data/out")
            assert "docker.sock" not in mount["Source"]


def test_reader_crash_mid_stream_publishes_nothing(tmp_path: Path) -> None:
    config = job(
        tmp_path,
        fixture_plugin("CrashingReader", {"batches_before_crash": 3, "exit_code": 3}),
        {"type": "builtin", "name": "parquet"},
    )
    store = StateStore(config.state_path)
    store.save("itest", {"cursor": 41}, "earlier-run")
    with pytest.raises(PluginError) as caught:
        run_job(config)
    error = caught.value
    assert (error.role, error.rule) == ("reader", "crash")
    assert "status 3" in str(error)
    assert "python:faulty:CrashingReader" in str(error)
    assert published(tmp_path / "out") == []
    assert store.get("itest") == {"cursor": 41}
    assert list((tmp_path / "out" / ".dativo-staging").iterdir()) == []


@pytest.mark.parametrize("crash_at", ["batch", "finalize"])
def test_writer_crash_publishes_nothing(tmp_path: Path, crash_at: str) -> None:
    config = job(
        tmp_path,
        {"type": "builtin", "name": "generate", "config": {"rows": 50_000, "columns": 4}},
        fixture_plugin("CrashingWriter", {"crash_at": crash_at}),
        run={"batch_size": 1000},
    )
    store = StateStore(config.state_path)
    store.save("itest", {"cursor": 7}, "earlier-run")
    with pytest.raises(PluginError) as caught:
        run_job(config)
    error = caught.value
    assert (error.role, error.rule) == ("writer", "crash")
    assert "status 4" in str(error)
    assert published(tmp_path / "out") == []
    assert store.get("itest") == {"cursor": 7}
    assert list((tmp_path / "out" / ".dativo-staging").iterdir()) == []


def test_memory_limit_is_reported_as_oom(tmp_path: Path) -> None:
    config = job(
        tmp_path,
        fixture_plugin("MemoryBombReader", resources={"memory": "96MiB"}),
        {"type": "builtin", "name": "null"},
    )
    with pytest.raises(PluginError) as caught:
        run_job(config)
    error = caught.value
    assert (error.role, error.rule) == ("reader", "memory")
    assert "memory limit 96MiB exceeded (OOM killed)" in str(error)
    assert "source.reader.resources.memory" in str(error)


def test_wall_clock_timeout(tmp_path: Path) -> None:
    config = job(
        tmp_path,
        fixture_plugin("SlowReader", {"interval": 1.0}, resources={"timeout": "3s"}),
        {"type": "builtin", "name": "null"},
    )
    started = time.monotonic()
    with pytest.raises(PluginError) as caught:
        run_job(config)
    assert (caught.value.role, caught.value.rule) == ("reader", "timeout")
    assert "source.reader.resources.timeout" in str(caught.value)
    assert time.monotonic() - started < 30


def start_slow_supervisor(
    tmp_path: Path, client: Any, name: str, interval: float, target: dict[str, Any]
) -> subprocess.Popen[str]:
    """`dativo run` of an endless slow reader in a subprocess, once both plugins run."""
    slow = {
        "version": 1,
        "name": name,
        "source": {"reader": fixture_plugin("SlowReader", {"interval": interval})},
        "target": target,
    }
    (tmp_path / "slow.yaml").write_text(yaml.safe_dump(slow))
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "dativo", "run", str(tmp_path / "slow.yaml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(own_containers(client, status="running")) < 2:
        time.sleep(0.2)
    if len(own_containers(client, status="running")) < 2:
        supervisor.kill()
        supervisor.communicate()
        pytest.fail("the supervisor never started both plugins")
    return supervisor


def test_killed_supervisor_leaves_containers_that_next_run_reaps(
    tmp_path: Path, client: Any
) -> None:
    target = {"writer": {"type": "builtin", "name": "null"}}
    supervisor = start_slow_supervisor(tmp_path, client, "killed", 0.5, target)
    names = own_containers(client, status="running")
    os.kill(supervisor.pid, signal.SIGKILL)
    supervisor.communicate()
    time.sleep(0.5)
    still = own_containers(client)
    assert still == names  # SIGKILL gives no chance to clean up...

    quick = job(
        tmp_path,
        {"type": "builtin", "name": "generate", "config": {"rows": 10, "columns": 2}},
        {"type": "builtin", "name": "null"},
    )
    report = run_job(quick)  # ...so the next run reaps them.
    # Any supervisor on the engine may reap a dead run; ours must at least leave none behind.
    assert set(report.reaped_containers) <= set(names)
    assert own_containers(client) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_supervisor_cleans_up(tmp_path: Path, client: Any, signum: int) -> None:
    target = {"path": "out", "writer": {"type": "builtin", "name": "parquet"}}
    supervisor = start_slow_supervisor(tmp_path, client, "interrupted", 0.2, target)
    try:
        time.sleep(1.0)  # batches are flowing
        supervisor.send_signal(signum)
        _, stderr = supervisor.communicate(timeout=60)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.communicate()
    assert supervisor.returncode == 130
    assert "interrupted" in stderr
    assert "Traceback" not in stderr
    assert published(tmp_path / "out") == []
    assert list((tmp_path / "out" / ".dativo-staging").iterdir()) == []
    # no_leftovers (autouse) checks containers and run directories.
