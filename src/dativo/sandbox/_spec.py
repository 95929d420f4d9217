"""Plain data describing a sandboxed container, independent of docker-py."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Mount:
    """A host path bind-mounted into the container."""

    source: Path
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to start one hardened plugin container."""

    name: str
    image: str
    command: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] | None = None
    environment: dict[str, str] = field(default_factory=dict)
    mounts: tuple[Mount, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    cpus: float = 1.0
    memory: int = 1 << 30
    pids: int = 128
    tmpfs: int = 64 << 20
    user: str = "65534:65534"
    runtime: str = "runc"
    # Host name -> address lines for the container's /etc/hosts: granted host names point at
    # the loopback relay of their forwarded Unix socket (the container still has no network).
    extra_hosts: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ExitInfo:
    """How a container ended."""

    status: int
    oom_killed: bool
    error: str | None = None


@dataclass(frozen=True)
class ImageInfo:
    """A local image as the engine knows it."""

    id: str
    tags: tuple[str, ...]
    labels: dict[str, str]
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    repo_digests: tuple[str, ...] = ()
