"""The only module that imports docker-py: hardened container start, inspection and reaping."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
from docker.types import LogConfig, Ulimit

from dativo.errors import EngineError
from dativo.sandbox._spec import ContainerSpec, ExitInfo, ImageInfo

LABEL_MANAGED = "org.dativo.managed"
LABEL_RUN_ID = "org.dativo.run-id"
LABEL_RUN_DIR = "org.dativo.run-dir"
LABEL_ROLE = "org.dativo.role"


def _no_engine(reason: object) -> EngineError:
    return EngineError(
        f"no Docker engine answers ({reason}). Start one with `make engine` "
        "(or `sudo dockerd &`), or set DOCKER_HOST.",
        transient=True,
    )


def connect(timeout: float = 30.0) -> docker.DockerClient:
    """Return a client for the local engine or explain how to start one."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://"):
        # docker-py leaks its socket when the engine is absent; look before it leaps.
        path = host.removeprefix("unix://")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(timeout)
            try:
                probe.connect(path)
            except OSError as exc:
                raise _no_engine(f"cannot connect to `{path}`: {exc.strerror or exc}") from None
    try:
        client = docker.from_env(timeout=int(timeout))
        client.ping()
    except docker.errors.DockerException as exc:
        raise _no_engine(exc) from None
    return client


@dataclass
class Container:
    """A started plugin container."""

    client: docker.DockerClient
    id: str
    name: str

    def _inspect(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = self.client.api.inspect_container(self.id)
        except docker.errors.NotFound:
            return None
        return data

    def inspect(self) -> dict[str, Any]:
        return self._inspect() or {}

    def exit_info(self) -> ExitInfo | None:
        """Exit facts, or None while the container still runs."""
        data = self._inspect()
        if data is None:
            return ExitInfo(status=-1, oom_killed=False, error="container vanished")
        state = data.get("State", {})
        if state.get("Running") or state.get("Restarting"):
            return None
        return ExitInfo(
            status=int(state.get("ExitCode", -1)),
            oom_killed=bool(state.get("OOMKilled")),
            error=state.get("Error") or None,
        )

    def wait(self, timeout: float) -> ExitInfo | None:
        deadline = time.monotonic() + timeout
        while True:
            info = self.exit_info()
            if info is not None or time.monotonic() >= deadline:
                return info
            time.sleep(0.05)

    def logs(self, tail: int = 40) -> str:
        try:
            raw: bytes = self.client.api.logs(self.id, stdout=True, stderr=True, tail=tail)
        except docker.errors.DockerException:
            return ""
        return raw.decode("utf-8", "replace")

    def kill(self) -> None:
        with contextlib.suppress(docker.errors.DockerException):
            self.client.api.kill(self.id)

    def remove(self) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            self.client.api.remove_container(self.id, force=True, v=True)


def image_info(client: docker.DockerClient, reference: str) -> ImageInfo:
    """Look an image up in the local engine (never pulls)."""
    try:
        data = client.api.inspect_image(reference)
    except docker.errors.ImageNotFound:
        raise EngineError(
            f"image `{reference}` is not in the local Docker engine; build it with "
            "`make images` (Dativo never pulls images)"
        ) from None
    except docker.errors.DockerException as exc:
        raise EngineError(f"cannot inspect image `{reference}`: {exc}") from None
    config = data.get("Config") or {}
    return ImageInfo(
        id=data["Id"], tags=tuple(data.get("RepoTags") or ()), labels=config.get("Labels") or {}
    )


def engine_id(client: docker.DockerClient) -> str:
    info = client.info()
    return f"{info.get('ID', '?')}/{info.get('ServerVersion', '?')}/{info.get('KernelVersion')}"


def start(client: docker.DockerClient, spec: ContainerSpec) -> Container:
    """Create and start a container with every hardening control; remove it if start fails."""
    volumes = {
        str(m.source): {"bind": m.target, "mode": "ro" if m.read_only else "rw"}
        for m in spec.mounts
    }
    labels = {LABEL_MANAGED: "true", **spec.labels}
    kwargs: dict[str, Any] = {
        "image": spec.image,
        "command": list(spec.command),
        "name": spec.name,
        "detach": True,
        "user": spec.user,
        "environment": dict(spec.environment),
        "labels": labels,
        "volumes": volumes,
        "working_dir": "/tmp",
        # Isolation: no network, no capabilities, no privilege gain, nothing shared.
        "network_mode": "none",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "privileged": False,
        "ipc_mode": "private",
        "read_only": True,
        "tmpfs": {"/tmp": f"size={spec.tmpfs},mode=1777,noexec,nosuid,nodev"},
        # Limits: memory without swap, CPU quota, process count, bounded logs, an init.
        "mem_limit": spec.memory,
        "memswap_limit": spec.memory,
        "nano_cpus": int(spec.cpus * 1e9),
        "pids_limit": spec.pids,
        "ulimits": [
            Ulimit(name="core", soft=0, hard=0),
            Ulimit(name="nofile", soft=1024, hard=1024),
        ],
        "log_config": LogConfig(type="json-file", config={"max-size": "1m", "max-file": "2"}),
        "init": True,
        "runtime": spec.runtime,
    }
    if spec.entrypoint is not None:
        kwargs["entrypoint"] = list(spec.entrypoint)
    try:
        created = client.containers.create(**kwargs)
    except docker.errors.ImageNotFound:
        raise EngineError(f"image `{spec.image}` vanished from the engine; rebuild it") from None
    except docker.errors.APIError as exc:
        raise EngineError(
            f"the engine refused to create `{spec.name}`: {exc.explanation}"
        ) from None
    container = Container(client=client, id=created.id, name=spec.name)
    try:
        created.start()
    except docker.errors.APIError as exc:
        container.remove()
        raise EngineError(f"the engine could not start `{spec.name}`: {exc.explanation}") from None
    except BaseException:
        container.remove()
        raise
    return container


def managed_containers(client: docker.DockerClient) -> list[tuple[Container, dict[str, str]]]:
    """Every container Dativo started on this engine, with its labels."""
    found = client.api.containers(all=True, filters={"label": f"{LABEL_MANAGED}=true"})
    return [
        (
            Container(client=client, id=c["Id"], name=(c.get("Names") or ["?"])[0].lstrip("/")),
            c.get("Labels") or {},
        )
        for c in found
    ]


def run_probe(client: docker.DockerClient, spec: ContainerSpec, timeout: float = 60.0) -> str:
    """Run a short probe container to completion and return its output."""
    container = start(client, spec)
    try:
        info = container.wait(timeout)
        output = container.logs(tail=200)
        if info is None:
            raise EngineError(f"the limits probe did not finish in {timeout:.0f} s")
        if info.status != 0:
            raise EngineError(f"the limits probe failed (exit {info.status}): {output[-2000:]}")
        return output
    finally:
        container.kill()
        container.remove()
