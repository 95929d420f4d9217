"""The sandbox runtime: hardened plugin containers, limit probes, run directories, reaping."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from dativo.sandbox import _docker
from dativo.sandbox._docker import LABEL_ROLE, LABEL_RUN_DIR, LABEL_RUN_ID, Container
from dativo.sandbox._probe import PROBE_SCRIPT, PROBE_VERSION, check_probe
from dativo.sandbox._rundir import (
    SOCKET_NAME,
    RunDirectory,
    is_run_alive,
    runtime_base,
    stale_run_dirs,
)
from dativo.sandbox._spec import ContainerSpec, ExitInfo, ImageInfo, Mount

__all__ = [
    "LABEL_ROLE",
    "LABEL_RUN_DIR",
    "LABEL_RUN_ID",
    "SOCKET_NAME",
    "Container",
    "ContainerSpec",
    "Engine",
    "ExitInfo",
    "ImageInfo",
    "Mount",
    "RunDirectory",
    "runtime_base",
]

log = logging.getLogger(__name__)

_PROBE_MEMORY = 96 << 20
_PROBE_CPUS = 0.5
_PROBE_PIDS = 48
_PROBE_CACHE_ENTRIES = 32


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(root) / "dativo"
    path.mkdir(parents=True, exist_ok=True)
    return path


class Engine:
    """A connection to the local container engine, with Dativo's policies around it."""

    def __init__(self) -> None:
        self._client = _docker.connect()

    def image(self, reference: str) -> ImageInfo:
        return _docker.image_info(self._client, reference)

    def start(self, spec: ContainerSpec) -> Container:
        return _docker.start(self._client, spec)

    def save_image(self, image_id: str, dest: Path) -> None:
        """Write the image `image_id` as a `docker save` archive."""
        _docker.save_image(self._client, image_id, dest)

    def load_image(self, archive: Path) -> list[str]:
        """Load a `docker save` archive; return the loaded image IDs."""
        return _docker.load_image(self._client, archive)

    def tag_image(self, image_id: str, reference: str) -> None:
        _docker.tag_image(self._client, image_id, reference)

    def verify_limits(self, image_id: str, *, user: str, runtime: str = "runc") -> dict[str, Any]:
        """Prove, once per engine and image, that every limit is enforced; raise if not.

        The result is cached by engine, image and probe version, so a run pays for the probe
        container only the first time. The cache keeps the latest entries of several images (each
        built-in plugin has its own), so a run's reader and writer do not evict each other.
        """
        key = f"{PROBE_VERSION}|{_docker.engine_id(self._client)}|{image_id}|{user}|{runtime}"
        cache = _cache_dir() / "engine-probe.json"
        try:
            entries = json.loads(cache.read_text()).get("entries")
        except (OSError, ValueError, AttributeError):
            entries = None
        if not isinstance(entries, dict):
            entries = {}
        if isinstance(entries.get(key), dict):
            return dict(entries[key])
        uid = int(user.split(":")[0])
        spec = ContainerSpec(
            name=f"dativo-probe-{os.getpid()}-{int(time.time() * 1000) % 100000}",
            image=image_id,
            entrypoint=("python3", "-c", PROBE_SCRIPT),
            labels={LABEL_RUN_ID: "probe"},
            memory=_PROBE_MEMORY,
            cpus=_PROBE_CPUS,
            pids=_PROBE_PIDS,
            user=user,
            runtime=runtime,
        )
        output = _docker.run_probe(self._client, spec)
        facts = check_probe(
            output,
            memory=_PROBE_MEMORY,
            cpus=_PROBE_CPUS,
            pids=_PROBE_PIDS,
            uid=uid,
        )
        entries.pop(key, None)
        entries[key] = facts
        kept = dict(list(entries.items())[-_PROBE_CACHE_ENTRIES:])
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"entries": kept}))
        tmp.replace(cache)
        return facts

    def reap(self, base: Path | None = None) -> list[str]:
        """Remove containers and run directories of supervisors that are gone.

        A run is gone when no process holds its lock (the supervisor crashed, was killed with
        SIGKILL, or the machine restarted). Returns the names of the removed containers.
        """
        removed: list[str] = []
        for container, labels in _docker.managed_containers(self._client):
            run_dir = labels.get(LABEL_RUN_DIR)
            if run_dir and is_run_alive(Path(run_dir)):
                continue
            probe_running = labels.get(LABEL_RUN_ID) == "probe" and container.exit_info() is None
            if not run_dir and probe_running:
                continue
            container.kill()
            container.remove()
            removed.append(container.name)
        base = base or runtime_base()
        for stale in stale_run_dirs(base):
            shutil.rmtree(stale, ignore_errors=True)
        if removed:
            log.warning("removed %d container(s) left by dead runs: %s", len(removed), removed)
        return removed

    def managed(self) -> list[tuple[Container, dict[str, str]]]:
        return _docker.managed_containers(self._client)
