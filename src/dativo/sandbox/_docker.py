"""The only module that imports docker-py: hardened container start, inspection and reaping."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
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
        try:
            self.client.api.remove_container(self.id, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            # 409 "removal ... already in progress": another supervisor's reaper got there
            # first (a finished limits probe, say); it is going away either way.
            if exc.status_code != 409:
                raise

    def oom_events(self) -> int:
        """How many `oom` events the engine recorded for this container so far.

        A process other than the plugin's main one can be OOM-killed while the main one lives
        on; `State.OOMKilled` may then stay false, but the engine still logs the event. The
        engine keeps only its latest events in memory (256 in moby), so this is best effort.
        """
        data = self._inspect()
        if data is None:
            return 0
        created = _epoch(str(data.get("Created", "")))
        if created is None:
            return 0
        try:
            events = self.client.api.events(
                since=int(created) - 1,
                until=f"{time.time():.3f}",
                filters={"container": self.id, "event": "oom"},
                decode=True,
            )
            return sum(1 for _ in events)
        except docker.errors.DockerException:
            return 0

    def cgroup_counters(self) -> dict[str, int]:
        """The kernel's limit counters of the running container, read from its host cgroup.

        Keys (each only when readable): `oom_kill` (processes OOM-killed), `pids_max` (forks
        refused at the process limit), `nr_periods`, `nr_throttled` and `throttled_usec` (CPU
        periods, and how many and how long the quota throttled it), `cpu_usage_usec`,
        `memory_peak` (the memory high-water mark in bytes). Empty
        when the container is gone or its cgroup is not visible from here (another host,
        another cgroup namespace).
        """
        data = self._inspect()
        pid = int(((data or {}).get("State") or {}).get("Pid") or 0)
        if pid <= 0:
            return {}
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            return {}
        return _read_counters(lines, self.id)


def _epoch(timestamp: str) -> float | None:
    """Seconds since the epoch of an engine timestamp such as `2026-01-01T12:00:00.123456789Z`."""
    head, dot, fraction = timestamp.rstrip("Z").partition(".")
    try:
        moment = datetime.datetime.fromisoformat(head).replace(tzinfo=datetime.UTC)
    except ValueError:
        return None
    return moment.timestamp() + (float(f"0.{fraction}") if dot and fraction.isdigit() else 0.0)


_CGROUP_ROOT = Path("/sys/fs/cgroup")
# (controller, file, key in the file, our name); v1 controllers each have a hierarchy.
_V1_COUNTERS = (
    ("memory", "memory.oom_control", "oom_kill", "oom_kill"),
    ("pids", "pids.events", "max", "pids_max"),
    ("cpu", "cpu.stat", "nr_periods", "nr_periods"),
    ("cpu", "cpu.stat", "nr_throttled", "nr_throttled"),
    ("cpu", "cpu.stat", "throttled_time", "throttled_usec"),  # nanoseconds, converted below
    ("cpuacct", "cpuacct.stat", "", "cpu_usage_usec"),  # cpuacct.usage, read below
)
# Single-value files: (v1 controller, v1 file, v2 file, our name).
_PEAKS = (("memory", "memory.max_usage_in_bytes", "memory.peak", "memory_peak"),)
_V2_COUNTERS = (
    ("memory.events", "oom_kill", "oom_kill"),
    ("pids.events", "max", "pids_max"),
    ("cpu.stat", "nr_periods", "nr_periods"),
    ("cpu.stat", "nr_throttled", "nr_throttled"),
    ("cpu.stat", "throttled_usec", "throttled_usec"),
    ("cpu.stat", "usage_usec", "cpu_usage_usec"),
)


def _flat_keyed(path: Path) -> dict[str, int]:
    values: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            values[key] = int(value)
    return values


def _read_counters(proc_cgroup: list[str], container_id: str) -> dict[str, int]:
    """Counters of the container's cgroups named by a `/proc/PID/cgroup` listing.

    Only a cgroup named after the container counts (`/docker/<id>`, `docker-<id>.scope`): the
    process may have exited and its pid been reused, or still be joining its cgroups (while
    runc sets it up, some hierarchies still say `/`, whose counters are the whole host's).
    """
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in proc_cgroup:
        _, controllers, path = line.split(":", 2)
        if container_id not in path:
            continue
        if controllers == "":
            v2 = path
        for controller in controllers.split(","):
            v1[controller] = path
    counters: dict[str, int] = {}
    if v1:
        for controller, filename, key, name in _V1_COUNTERS:
            if controller in v1:
                directory = _CGROUP_ROOT / controller / v1[controller].lstrip("/")
                if controller == "cpuacct":
                    with contextlib.suppress(OSError, ValueError):
                        usage = (directory / "cpuacct.usage").read_text()
                        counters[name] = int(usage) // 1000
                    continue
                value = _flat_keyed(directory / filename).get(key)
                if value is not None:
                    counters[name] = value // 1000 if key == "throttled_time" else value
        for controller, filename, _, name in _PEAKS:
            if controller in v1:
                peak_file = _CGROUP_ROOT / controller / v1[controller].lstrip("/") / filename
                with contextlib.suppress(OSError, ValueError):
                    counters[name] = int(peak_file.read_text())
    elif v2 is not None:
        directory = _CGROUP_ROOT / v2.lstrip("/")
        for filename, key, name in _V2_COUNTERS:
            value = _flat_keyed(directory / filename).get(key)
            if value is not None:
                counters[name] = value
        for _, _, filename, name in _PEAKS:  # memory.peak: Linux 5.19 and later
            with contextlib.suppress(OSError, ValueError):
                counters[name] = int((directory / filename).read_text())
    return counters


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
        id=data["Id"],
        tags=tuple(data.get("RepoTags") or ()),
        labels=config.get("Labels") or {},
        entrypoint=_strings(config.get("Entrypoint")),
        cmd=_strings(config.get("Cmd")),
        repo_digests=tuple(data.get("RepoDigests") or ()),
    )


def _strings(value: object) -> tuple[str, ...] | None:
    if isinstance(value, list):
        return tuple(str(v) for v in value)
    return None


def save_image(client: docker.DockerClient, image_id: str, dest: Path) -> None:
    """`docker save` the image `image_id` (by ID, so no tag can change what is saved)."""
    try:
        with dest.open("wb") as out:
            for chunk in client.api.get_image(image_id, chunk_size=1 << 20):
                out.write(chunk)
    except docker.errors.ImageNotFound:
        raise EngineError(f"image `{image_id}` is not in the local Docker engine") from None
    except docker.errors.DockerException as exc:
        raise EngineError(f"cannot save image `{image_id}`: {exc}") from None


def load_image(client: docker.DockerClient, archive: Path) -> list[str]:
    """`docker load` an archive; return the IDs of the images it loaded."""
    loaded: list[str] = []
    try:
        with archive.open("rb") as data:
            for message in client.api.load_image(data):
                if "error" in message:
                    raise EngineError(f"the engine refused the image archive: {message['error']}")
                text = str(message.get("stream", "")).strip()
                if text.startswith("Loaded image ID:"):
                    loaded.append(text.removeprefix("Loaded image ID:").strip())
                elif text.startswith("Loaded image:"):
                    reference = text.removeprefix("Loaded image:").strip()
                    loaded.append(client.api.inspect_image(reference)["Id"])
    except docker.errors.DockerException as exc:
        raise EngineError(f"cannot load the image archive: {exc}") from None
    return loaded


def tag_image(client: docker.DockerClient, image_id: str, reference: str) -> None:
    """Tag `image_id` as `repository:tag`."""
    repository, _, tag = reference.rpartition(":")
    if not repository or "/" in tag:
        repository, tag = reference, "latest"
    try:
        client.api.tag(image_id, repository, tag, force=True)
    except docker.errors.DockerException as exc:
        raise EngineError(f"cannot tag `{image_id}` as `{reference}`: {exc}") from None


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
    if spec.extra_hosts:
        kwargs["extra_hosts"] = dict(spec.extra_hosts)
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
    for attempt in range(3):
        name = spec.name if attempt == 0 else f"{spec.name}-{attempt}"
        container = start(client, dataclasses.replace(spec, name=name))
        try:
            info = container.wait(timeout)
            output = container.logs(tail=200)
        finally:
            container.kill()
            container.remove()
        if info is not None and info.error == "container vanished" and attempt < 2:
            # Another supervisor's reaper removed the finished probe before we read it.
            continue
        # gVisor hides the cgroup limits from inside and counts its own threads against the
        # process limit, so the probe cannot pass there (docs/threat-model.md).
        runtime = "" if spec.runtime == "runc" else f" under the `{spec.runtime}` runtime"
        if info is None:
            raise EngineError(f"the limits probe did not finish in {timeout:.0f} s{runtime}")
        if info.status != 0:
            raise EngineError(
                f"the limits probe failed{runtime} (exit {info.status}): {output[-2000:]}"
            )
        return output
    raise AssertionError("unreachable")  # pragma: no cover
