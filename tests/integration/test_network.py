"""Network grants with real containers: a granted Postgres answers; nothing else does.

The reader is `tests/fixtures/plugins/netprobe.py` (a `type: python` plugin in the stock plugin
image, which has no database driver): it logs in to a real PostgreSQL (the locally built
service image, `make services`) with SCRAM-SHA-256 and runs a query through the supervisor's
forwarder (the Unix socket, the plugin host's loopback relay, and the granted host name), then
tries every other way out it can think of and reports each outcome as a row. The test reads the
published rows and the run report.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pyarrow.parquet as pq
import pytest
import yaml
from tests.services import PostgresService, ServiceError, postgres_service

from dativo.config import parse_job
from dativo.errors import ConfigError, PluginError
from dativo.sandbox import LABEL_RUN_DIR, runtime_base
from dativo.supervisor import RunOptions, _network, run_job

pytestmark = pytest.mark.docker

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "plugins"
MANAGED = {"label": "org.dativo.managed=true"}
MARKER = "granted-and-forwarded"
PG_NAME = "pg.dativo.test"  # resolved by the supervisor only (the test's resolver below)
DOCKER0_GATEWAY = "172.17.0.1"  # the engine's default bridge, even when it is down


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg(docker_engine: str) -> Iterator[PostgresService]:
    """A fresh PostgreSQL with one marker row; a missing image fails (`make services`)."""
    try:
        import psycopg
    except ImportError:
        pytest.fail("psycopg is not installed: run `make venv` (VENV_EXTRAS)", pytrace=False)
    try:
        service = postgres_service()
        pg = service.__enter__()
    except ServiceError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE marker (v text)")
            conn.execute("INSERT INTO marker VALUES (%s)", (MARKER,))
        yield pg
    finally:
        service.__exit__(None, None, None)


@pytest.fixture
def client(docker_engine: str) -> Iterator[Any]:
    engine = docker.from_env()
    yield engine
    engine.close()


def own_containers(client: Any) -> list[Any]:
    base = str(runtime_base())
    return [
        c
        for c in client.containers.list(all=True, filters=MANAGED)
        if c.labels.get(LABEL_RUN_DIR, "").startswith(base + "/")
    ]


@pytest.fixture(autouse=True)
def pg_password(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe's config names its password as `${DATIVO_TEST_PGPASSWORD}`: the supervisor
    expands it and hands it over only in `init`."""
    monkeypatch.setenv("DATIVO_TEST_PGPASSWORD", "dativo")


@pytest.fixture(autouse=True)
def no_leftovers(client: Any) -> Iterator[None]:
    """No container, run directory, socket or forwarder thread outlives a test."""
    yield
    assert own_containers(client) == []
    assert list(runtime_base().iterdir()) == []
    leftover = [t.name for t in threading.enumerate() if t.name.startswith("dativo-net-")]
    assert leftover == [], f"forwarder threads left running: {leftover}"


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch, pg: PostgresService) -> None:
    """The supervisor resolves `pg.dativo.test` to the Postgres container (nothing else changes:
    the plugin's container never sees this resolver)."""
    real = _network.getaddrinfo

    def resolve(host: str, port: int, *args: Any) -> list[tuple[Any, ...]]:
        if host == PG_NAME:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (pg.container_ip, port))]
        return real(host, port, *args)

    monkeypatch.setattr(_network, "getaddrinfo", resolve)


class Listener:
    """A TCP listener of the test on the supervisor's host, counting what connects."""

    def __init__(self, address: str) -> None:
        self.sock = socket.create_server((address, 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[Any] = []
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.accepted.append(peer)
            conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def wait_for(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def host_address() -> str:
    """The supervisor host's own non-loopback address (the source of its default route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("203.0.113.1", 9))  # TEST-NET-3: nothing is sent
        return str(sock.getsockname()[0])


def services_gateway(pg: PostgresService) -> str:
    found = subprocess.run(
        ["docker", "network", "inspect", pg.network, "--format", "{{json .IPAM.Config}}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return str(json.loads(found.stdout)[0]["Gateway"])


def job(tmp_path: Path, network: list[str], config: dict[str, Any]) -> Any:
    return parse_job(
        {
            "version": 1,
            "name": "network",
            "source": {
                "reader": {
                    "type": "python",
                    "implementation": "netprobe:NetProbeReader",
                    "path": str(FIXTURES),
                    "network": network,
                    "config": config,
                }
            },
            "target": {"path": "out", "writer": {"type": "builtin", "name": "parquet"}},
            "run": {"handshake_timeout": "60s"},
        },
        base_dir=tmp_path,
    )


def rows(target: Path) -> list[dict[str, Any]]:
    files = sorted(p for p in target.rglob("*.parquet") if ".dativo-staging" not in p.parts)
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def login(pg: PostgresService, destination: str, via: str) -> dict[str, Any]:
    return {
        "destination": destination,
        "via": via,
        "user": pg.user,
        "password": "${DATIVO_TEST_PGPASSWORD}",
        "database": pg.database,
        "query": "SELECT v, current_user, inet_server_port() FROM marker",
    }


# -- tests -------------------------------------------------------------------------------------


def test_granted_postgres_answers_and_nothing_else_does(
    tmp_path: Path, pg: PostgresService, resolver: None
) -> None:
    direct = f"{pg.container_ip}:5432"
    by_name = f"{PG_NAME}:5432"
    host_ip = host_address()
    gateway = services_gateway(pg)
    loopback = Listener("127.0.0.1")  # the supervisor's host, loopback only
    anywhere = Listener("0.0.0.0")  # the supervisor's host, every address (gateways too)
    try:
        # The listeners are real: the supervisor's host reaches them on each address probed.
        for address, port in (
            ("127.0.0.1", loopback.port),
            (host_ip, anywhere.port),
            (gateway, anywhere.port),
        ):
            socket.create_connection((address, port), timeout=3).close()
        wait_for(lambda: len(loopback.accepted) == 1 and len(anywhere.accepted) == 2)
        tcp = [
            (pg.container_ip, 5432),  # the granted server, but not through the forwarder
            (pg.container_ip, 5433),  # another port on the granted host
            (pg.container_ip, 22),
            ("127.0.0.1", pg.port),  # the server's port published on the host
            ("127.0.0.1", loopback.port),  # the supervisor's own ports
            (host_ip, anywhere.port),
            (host_ip, pg.port),
            (gateway, anywhere.port),  # the bridge gateways
            (gateway, pg.port),
            (DOCKER0_GATEWAY, anywhere.port),
            ("1.1.1.1", 443),  # other hosts
            ("8.8.8.8", 53),
            ("169.254.169.254", 80),
            ("::1", loopback.port),
            ("2606:4700:4700::1111", 443),
        ]
        resolvers = [
            "resolv.conf",  # whatever the container's /etc/resolv.conf names
            "127.0.0.11",  # Docker's embedded DNS on user-defined networks
            "127.0.0.53",  # systemd-resolved's stub
            "8.8.8.8",
            "1.1.1.1",
            gateway,
            DOCKER0_GATEWAY,
            host_ip,
            "2001:4860:4860::8888",
        ]
        probes = [{"kind": "tcp", "host": h, "port": p} for h, p in tcp]
        probes += [
            {"kind": k, "host": h, "port": 53} for k in ("udp_dns", "tcp_dns") for h in resolvers
        ]
        probes += [
            {"kind": "resolve", "host": name, "port": 443}
            for name in ("example.com", pg.container_name, "host.docker.internal", "gateway")
        ]
        config = {
            "postgres": [
                login(pg, direct, "socket"),
                login(pg, direct, "tcp"),
                login(pg, by_name, "name"),
                login(pg, by_name, "socket"),
            ],
            "probes": probes,
        }
        report = run_job(job(tmp_path, [direct, by_name], config))
    finally:
        loopback.close()
        anywhere.close()
    found = rows(tmp_path / "out")
    by_check = {(r["check"], r["target"]): r for r in found}

    # The granted server answers the query, by every way a plugin may ask for it.
    expected = repr([[MARKER, pg.user, "5432"]])
    for via, destination in (
        ("socket", direct),
        ("tcp", direct),
        ("name", by_name),
        ("socket", by_name),
    ):
        row = by_check[(f"postgres-{via}", destination)]
        assert row["ok"], row
        assert row["detail"] == expected

    # What the plugin was told, and what it has: only `lo`.
    env = by_check[("env", "DATIVO_NETWORK")]["detail"]
    assert f"{direct}=/run/dativo/net/{pg.container_ip}/.s.PGSQL.5432" in env
    assert f"{by_name}=/run/dativo/net/{PG_NAME}/.s.PGSQL.5432" in env
    assert by_check[("interfaces", "")]["detail"] == "['lo']"

    # Every other way out failed.
    attempts = [r for r in found if r["check"] in ("tcp", "udp_dns", "tcp_dns", "resolve")]
    assert len(attempts) >= len(probes)
    leaks = [r for r in attempts if r["ok"]]
    assert leaks == [], f"reached from the sandbox: {leaks}"
    # Nothing more than the sanity checks above ever reached the test's listeners.
    assert (len(loopback.accepted), len(anywhere.accepted)) == (1, 2)
    resolved = [r for r in attempts if r["check"] == "resolve"]
    assert all(r["detail"].startswith("gaierror") for r in resolved), resolved

    # Counted per destination; the writer has no grant and no forwarder.
    network = report.to_json()["plugins"]["reader"]["network"]
    assert set(network) == {direct, by_name}
    assert network[direct]["pinned"] == [direct]
    assert network[by_name]["pinned"] == [direct]
    assert network[direct]["connections"] == 2
    assert network[by_name]["connections"] == 2
    for stats in network.values():
        assert stats["failed_connects"] == 0
        assert stats["refused_over_limit"] == 0
        assert stats["bytes_in"] > 500  # authentication, parameters, the row
        assert stats["bytes_out"] > 100
    assert "network" not in report.to_json()["plugins"]["writer"]


def test_a_granted_destination_that_is_down_is_named(
    tmp_path: Path, docker_engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    down = f"127.0.0.1:{probe.getsockname()[1]}"
    probe.close()  # nothing listens there now
    config = {
        "postgres": [
            {
                "destination": down,
                "via": "socket",
                "user": "dativo",
                "password": "${DATIVO_TEST_PGPASSWORD}",
                "database": "dativo",
                "query": "SELECT 1",
            }
        ],
        "fail_on_postgres_error": True,
    }
    with pytest.raises(PluginError) as caught:
        run_job(job(tmp_path, [down], config))
    message = str(caught.value)
    assert caught.value.role == "reader"
    assert f"cannot query `{down}`" in message  # the plugin's own words
    assert f"granted destination `{down}` ({down}) refused the connection" in message
    assert "fix: check that the granted destination is up" in message
    assert f"connect failed: granted destination `{down}`" in caplog.text
    assert rows(tmp_path / "out") == []


def test_a_grant_beyond_the_signed_manifest_starts_nothing(
    tmp_path: Path, docker_engine: str
) -> None:
    started: list[Any] = []
    spec = parse_job(
        {
            "version": 1,
            "name": "network",
            "source": {
                "reader": {
                    "type": "builtin",
                    "name": "generate",
                    "config": {"rows": 10},
                    "network": ["db.example.com:5432"],
                }
            },
            "target": {"writer": {"type": "builtin", "name": "null"}},
        },
        base_dir=tmp_path,
    )
    with pytest.raises(ConfigError) as caught:
        run_job(spec, RunOptions(on_start=started.append))
    assert caught.value.field == "source.reader.network"
    assert "grants `db.example.com:5432`" in str(caught.value)
    assert "the signed manifest of `dativo/generate`" in str(caught.value)
    assert started == []


def test_an_unresolvable_grant_starts_nothing(tmp_path: Path, docker_engine: str) -> None:
    started: list[Any] = []
    with pytest.raises(ConfigError) as caught:
        run_job(job(tmp_path, ["nowhere.invalid:5432"], {}), RunOptions(on_start=started.append))
    assert "cannot resolve the granted destination `nowhere.invalid:5432`" in str(caught.value)
    assert caught.value.field == "source.reader.network"
    assert started == []


def test_in_process_mode_does_not_enforce_grants(
    tmp_path: Path, pg: PostgresService, caplog: pytest.LogCaptureFixture
) -> None:
    granted = f"127.0.0.1:{pg.port}"
    config = {"postgres": [login(pg, granted, "tcp")]}
    report = run_job(job(tmp_path, [granted], config), RunOptions(in_process=True))
    (row,) = [r for r in rows(tmp_path / "out") if r["check"] == "postgres-tcp"]
    assert row["ok"], row
    assert "are not enforced" in caplog.text
    assert "network" not in report.to_json()["plugins"].get("reader", {})


def test_the_cli_summary_counts_each_destination(tmp_path: Path, pg: PostgresService) -> None:
    granted = f"127.0.0.1:{pg.port}"  # a literal may name the supervisor's own machine
    spec = {
        "version": 1,
        "name": "network-cli",
        "source": {
            "reader": {
                "type": "python",
                "implementation": "netprobe:NetProbeReader",
                "path": str(FIXTURES),
                "network": [granted],
                "config": {"postgres": [login(pg, granted, "socket")]},
            }
        },
        "target": {"writer": {"type": "builtin", "name": "null"}},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    done = subprocess.run(
        [sys.executable, "-m", "dativo", "run", str(tmp_path / "job.yaml"), "--json", "r.json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"network: reader -> {granted}: 1 connection(s)" in done.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    stats = report["plugins"]["reader"]["network"][granted]
    assert stats["connections"] == 1
    assert stats["bytes_in"] > 500
