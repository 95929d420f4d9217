"""Throw-away service containers for tests and benchmarks: PostgreSQL, and S3 + KMS (moto).

Plain helpers, no pytest: tests and benchmarks alike import them::

    from tests.services import postgres_service, s3_service

    with postgres_service() as pg:            # PostgresService
        psycopg.connect(pg.dsn)
    with s3_service() as s3:                  # S3Service
        boto3.client("s3", **s3.client_kwargs())
        boto3.client("kms", **s3.client_kwargs())

Each context manager starts one container of a locally built image (`make services`,
sandbox/build_services.py) with testcontainers' generic ``DockerContainer``, publishes its port
on a random 127.0.0.1 port, waits until the service answers, yields its connection facts and
removes the container (``docker rm -f``, volumes too) on the way out, whatever happened. Images
are never pulled: a missing one raises ``ServiceError`` naming `make services`.

* Ryuk (testcontainers' reaper) is off: its image cannot be pulled here. Instead, every container
  is labelled ``org.dativo.service=true`` plus its owner (host and pid), and starting a service
  first removes the service containers whose owner process on this host is gone (a test run
  killed with SIGKILL, say).
* The containers join a user-defined bridge network, ``dativo-services`` (created on first use,
  kept; ``DATIVO_SERVICES_NETWORK`` or ``network=`` picks another), not the engine's default
  bridge: containers on it reach a service at ``container_ip`` (or by container name), and the
  helpers do not depend on the default ``docker0`` bridge being healthy.
* Postgres keeps its data on a tmpfs and runs with fsync off: test data only.

Images: ``DATIVO_SVC_POSTGRES_IMAGE`` / ``DATIVO_SVC_S3_IMAGE``, else the tag recorded in
``build/services.json``, else the stable tags ``dativo/svc-postgres:15`` and
``dativo/svc-s3:moto-<version>``. See docs/services.md.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import struct
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Before testcontainers reads its configuration; set on the object too, in case another module
# imported testcontainers first.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

from testcontainers.core.config import testcontainers_config
from testcontainers.core.container import DockerContainer

testcontainers_config.ryuk_disabled = True

__all__ = [
    "LABEL",
    "NETWORK",
    "PostgresService",
    "S3Service",
    "ServiceError",
    "postgres_service",
    "reap_orphans",
    "s3_service",
    "service_image",
]

ROOT = Path(__file__).resolve().parents[1]
SERVICES_JSON = ROOT / "build" / "services.json"
S3_REQUIREMENTS = ROOT / "sandbox" / "services" / "s3" / "requirements.txt"

LABEL = "org.dativo.service"
LABEL_NAME = "org.dativo.service.name"
LABEL_OWNER = "org.dativo.service.owner"
NETWORK = os.environ.get("DATIVO_SERVICES_NETWORK", "").strip() or "dativo-services"

POSTGRES_PORT = 5432
S3_PORT = 5000
PG_DATA_MOUNT = "/var/lib/postgresql/data"
PG_UID = 999  # the image's postgres user
POLL = 0.02  # seconds between readiness probes
STATUS_EVERY = 0.25  # seconds between container status checks while waiting


class ServiceError(RuntimeError):
    """A service image is missing, or its container did not become ready (logs attached)."""


@dataclass(frozen=True)
class PostgresService:
    """How to reach a running Postgres: from the host (host/port/dsn) or from a container on
    the same network (container_ip, port 5432: ``container_dsn``)."""

    host: str
    port: int
    user: str
    password: str
    database: str
    dsn: str
    container_ip: str
    network: str = NETWORK
    container_id: str = ""
    container_name: str = ""
    startup_seconds: float = 0.0

    @property
    def container_dsn(self) -> str:
        """The DSN for a client in another container on ``network``."""
        return _pg_dsn(self.container_ip, POSTGRES_PORT, self.user, self.password, self.database)


@dataclass(frozen=True)
class S3Service:
    """An S3- and KMS-compatible endpoint (moto server mode); any AWS API moto emulates answers
    on the same endpoint."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    container_ip: str
    network: str = NETWORK
    container_id: str = ""
    container_name: str = ""
    startup_seconds: float = 0.0

    @property
    def container_endpoint_url(self) -> str:
        """The endpoint for a client in another container on ``network``."""
        return f"http://{self.container_ip}:{S3_PORT}"

    def client_kwargs(self) -> dict[str, str]:
        """Keyword arguments for ``boto3.client("s3" | "kms" | ..., **kwargs)``."""
        return {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
        }


# -- images ------------------------------------------------------------------


def _moto_version() -> str | None:
    with contextlib.suppress(OSError):
        text = S3_REQUIREMENTS.read_text(encoding="utf-8")
        found = re.search(r"^moto(?:\[[^\]]*\])?==([^\s;#]+)", text, re.MULTILINE)
        if found:
            return found.group(1)
    return None


def _candidates(name: str) -> list[str]:
    override = os.environ.get(f"DATIVO_SVC_{name.upper()}_IMAGE", "").strip()
    if override:
        return [override]
    found: list[str] = []
    with contextlib.suppress(OSError, ValueError, AttributeError):
        recorded = json.loads(SERVICES_JSON.read_text(encoding="utf-8"))[name]["tag"]
        if isinstance(recorded, str):
            found.append(recorded)
    if name == "postgres":
        found.append("dativo/svc-postgres:15")
    elif version := _moto_version():
        found.append(f"dativo/svc-s3:moto-{version}")
    return found


def service_image(name: str, client: Any = None) -> str:
    """The local image of service ``name`` ("postgres" or "s3"); never pulls.

    Raises ServiceError when no candidate exists in the engine.
    """
    import docker  # testcontainers' dependency

    own = client is None
    client = client or docker.from_env()
    try:
        candidates = _candidates(name)
        for ref in candidates:
            with contextlib.suppress(docker.errors.ImageNotFound):
                client.images.get(ref)
                return ref
    finally:
        if own:
            client.close()
    raise ServiceError(
        f"no {name} service image in the engine (looked for {', '.join(candidates) or 'nothing'});"
        " build it with `make services` (sandbox/build_services.py): images are never pulled"
    )


# -- containers --------------------------------------------------------------


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_orphans(client: Any) -> list[str]:
    """Remove service containers whose owner process (on this host) no longer exists.

    Ryuk is off, so a run killed before its ``finally`` leaves its containers behind; the next
    run removes them. Containers of live processes and of other hosts are left alone.
    """
    removed: list[str] = []
    host = socket.gethostname()
    for container in client.containers.list(all=True, filters={"label": f"{LABEL}=true"}):
        owner = (container.labels or {}).get(LABEL_OWNER, "")
        owner_host, _, pid = owner.rpartition(":")
        if owner_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        with contextlib.suppress(Exception):
            container.remove(force=True, v=True)
            removed.append(container.name)
    return removed


def _ensure_network(client: Any, name: str) -> None:
    import docker

    if any(n.name == name for n in client.networks.list(names=[name])):
        return
    with contextlib.suppress(docker.errors.APIError):  # a concurrent run created it first
        client.networks.create(name, driver="bridge", check_duplicate=True, labels={LABEL: "true"})
    if not any(n.name == name for n in client.networks.list(names=[name])):
        raise ServiceError(f"cannot create the Docker network {name}")


@dataclass
class _Started:
    container: DockerContainer
    name: str
    host_port: int
    container_ip: str
    started_at: float
    attrs: dict[str, Any] = field(default_factory=dict)

    def logs(self, lines: int = 60) -> str:
        with contextlib.suppress(Exception):
            raw = self.container.get_wrapped_container().logs(tail=lines)
            return bytes(raw).decode("utf-8", "replace")
        return "(no logs)"


@contextlib.contextmanager
def _service_container(
    service: str,
    *,
    image: str | None,
    port: int,
    network: str | None,
    env: dict[str, str] | None = None,
    command: Sequence[str] | None = None,
    tmpfs: dict[str, str] | None = None,
) -> Iterator[_Started]:
    """Start one labelled container of a local image, port published on 127.0.0.1; always
    remove it afterwards."""
    import docker

    started_at = time.monotonic()
    network = network or NETWORK
    name = f"dativo-svc-{service}-{uuid.uuid4().hex[:10]}"
    container = DockerContainer("unused", env=dict(env or {}))
    client = container.get_docker_client().client
    try:
        container.image = image or service_image(service, client)  # no hub prefix, no pull
        try:
            client.images.get(container.image)
        except Exception as exc:
            raise ServiceError(
                f"image {container.image} is not in the engine: run `make services`"
                " (images are never pulled)"
            ) from exc
        reap_orphans(client)
        _ensure_network(client, network)
        if command:
            container.with_command(list(command))
        # (host IP,) = that address, a random free port.
        container.ports[f"{port}/tcp"] = ("127.0.0.1",)  # type: ignore[assignment]
        container.tmpfs.update(tmpfs or {})
        container.with_name(name)
        container.with_kwargs(
            network=network,
            labels={LABEL: "true", LABEL_NAME: service, LABEL_OWNER: _owner()},
        )
        container.start()
        wrapped = container.get_wrapped_container()
        wrapped.reload()
        attrs = wrapped.attrs
        bindings = (attrs["NetworkSettings"].get("Ports") or {}).get(f"{port}/tcp") or []
        if not bindings:
            raise ServiceError(f"{name}: port {port} is not published ({wrapped.status})")
        yield _Started(
            container=container,
            name=name,
            host_port=int(bindings[0]["HostPort"]),
            container_ip=attrs["NetworkSettings"]["Networks"][network]["IPAddress"],
            started_at=started_at,
            attrs=attrs,
        )
    finally:
        # docker rm -f -v, then close the client. Nothing to remove if it was never created.
        try:
            container.stop()
        except docker.errors.NotFound:
            client.close()


def _wait_ready(started: _Started, probe: Callable[[], bool], timeout: float, what: str) -> float:
    """Call probe() until it returns True; fail early if the container stops. Returns seconds
    since the container was requested."""
    deadline = time.monotonic() + timeout
    next_status = time.monotonic() + STATUS_EVERY
    last_error: BaseException | None = None
    while True:
        try:
            if probe():
                return time.monotonic() - started.started_at
        except (OSError, http.client.HTTPException) as exc:
            last_error = exc
        now = time.monotonic()
        if now >= next_status:
            next_status = now + STATUS_EVERY
            wrapped = started.container.get_wrapped_container()
            wrapped.reload()
            if wrapped.status not in ("created", "running"):
                raise ServiceError(
                    f"{what} container {started.name} stopped ({wrapped.status}, exit code "
                    f"{wrapped.attrs['State'].get('ExitCode')}) before it was ready; its logs:\n"
                    + started.logs()
                )
        if now >= deadline:
            raise ServiceError(
                f"{what} in {started.name} was not ready after {timeout:.0f} s"
                f" (last error: {last_error!r}); its logs:\n" + started.logs()
            )
        time.sleep(POLL)


# -- Postgres ----------------------------------------------------------------


def _pg_dsn(host: str, port: int, user: str, password: str, database: str) -> str:
    def q(value: str) -> str:
        return urllib.parse.quote(value, safe="")

    return f"postgresql://{q(user)}:{q(password)}@{host}:{port}/{q(database)}"


def _pg_accepts(host: str, port: int, user: str, database: str) -> bool:
    """pg_isready's check: send a startup packet; an authentication request ('R') means the
    server accepts connections. While it starts it answers an error (57P03); before it listens,
    docker's proxy accepts and closes."""
    params = b"".join(
        k + b"\0" + v.encode() + b"\0" for k, v in ((b"user", user), (b"database", database))
    )
    body = struct.pack("!I", 196608) + params + b"\0"  # protocol 3.0
    with socket.create_connection((host, port), timeout=2) as sock:
        sock.settimeout(2)
        sock.sendall(struct.pack("!I", len(body) + 4) + body)
        return sock.recv(1) == b"R"


def _pg_select_1(dsn: str) -> bool:
    """A real login and ``SELECT 1`` with psycopg; True without psycopg (the protocol check
    above has passed)."""
    try:
        import psycopg
    except ImportError:
        return True
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except psycopg.OperationalError as exc:
        # The server listens only once the user and database exist: a refused login now will
        # not succeed later (invalid authorization 28xxx, unknown database 3D000).
        state = getattr(exc, "sqlstate", None) or ""
        if state.startswith("28") or state == "3D000" or "fe_sendauth" in str(exc):
            raise ServiceError(f"PostgreSQL refused the login: {exc}") from exc
        raise ConnectionError(str(exc)) from exc


@contextlib.contextmanager
def postgres_service(
    *,
    user: str = "dativo",
    password: str = "dativo",
    database: str = "dativo",
    image: str | None = None,
    network: str | None = None,
    postgres_args: Sequence[str] = (),
    timeout: float = 60.0,
) -> Iterator[PostgresService]:
    """A fresh PostgreSQL 15 (data on a tmpfs, fsync off) until the block ends.

    ``postgres_args`` go to the server, e.g. ``("-c", "wal_level=logical")``.
    """
    if not (user and password and database):
        raise ValueError("user, password and database must not be empty")
    env = {"POSTGRES_USER": user, "POSTGRES_PASSWORD": password, "POSTGRES_DB": database}
    with _service_container(
        "postgres",
        image=image,
        port=POSTGRES_PORT,
        network=network,
        env=env,
        command=list(postgres_args),
        tmpfs={PG_DATA_MOUNT: f"uid={PG_UID},gid={PG_UID},mode=0700"},
    ) as started:
        host, port = "127.0.0.1", started.host_port
        dsn = _pg_dsn(host, port, user, password, database)
        seconds = _wait_ready(
            started,
            lambda: _pg_accepts(host, port, user, database) and _pg_select_1(dsn),
            timeout,
            "PostgreSQL",
        )
        yield PostgresService(
            host=host,
            port=port,
            user=user,
            password=password,
            database=database,
            dsn=dsn,
            container_ip=started.container_ip,
            network=network or NETWORK,
            container_id=started.container.get_container_id(),
            container_name=started.name,
            startup_seconds=seconds,
        )


# -- S3 / KMS (moto) -----------------------------------------------------------


def _http_answers(host: str, port: int) -> bool:
    """Any HTTP response at all: the server is up (moto builds each backend on first use)."""
    conn = http.client.HTTPConnection(host, port, timeout=2)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
        return True
    finally:
        conn.close()


@contextlib.contextmanager
def s3_service(
    *,
    access_key: str = "dativo-test",
    secret_key: str = "dativo-test-secret",
    region: str = "us-east-1",
    image: str | None = None,
    network: str | None = None,
    timeout: float = 60.0,
) -> Iterator[S3Service]:
    """A fresh moto server (S3, KMS, ... in memory) until the block ends.

    moto accepts any credentials; these are what clients should sign with.
    """
    with _service_container("s3", image=image, port=S3_PORT, network=network) as started:
        host, port = "127.0.0.1", started.host_port
        seconds = _wait_ready(started, lambda: _http_answers(host, port), timeout, "moto")
        yield S3Service(
            endpoint_url=f"http://{host}:{port}",
            access_key=access_key,
            secret_key=secret_key,
            region=region,
            container_ip=started.container_ip,
            network=network or NETWORK,
            container_id=started.container.get_container_id(),
            container_name=started.name,
            startup_seconds=seconds,
        )
