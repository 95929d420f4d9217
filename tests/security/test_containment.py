"""Hostile plugins against the sandbox itself: processes, memory, CPU, disk, network, host
files, /proc and /sys, privilege escalation. Each runs under the default limits (CPU 1, memory
1 GiB, 128 processes, /tmp 64 MiB) unless a test says otherwise, and each run must end as
expected having published nothing and left the state, the host and the engine as they were.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.security._attack import attack, expect, image_plugin

pytestmark = [pytest.mark.security, pytest.mark.docker]

REFUSED = {"EROFS", "EACCES", "EPERM", "ENOENT"}


class HostWatch:
    """Times a trivial host operation (start `true`) and samples the plugin's cgroup counters
    while a hostile run goes on, from a thread of the test."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.container: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def on_start(self, process: Any) -> None:
        if process.launch.role == "reader":
            self.container = process.container

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            subprocess.run(["true"], check=True)
            self.latencies.append(time.monotonic() - began)
            if self.container is not None:
                counters: dict[str, int] = {}
                with contextlib.suppress(docker.errors.DockerException):  # being removed
                    counters = self.container.cgroup_counters()
                if counters:
                    self.samples.append((time.monotonic(), counters))
            self._stop.wait(0.25)

    def __enter__(self) -> HostWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_fork_bomb_is_held_by_the_process_limit(
    fixture_images: dict[str, str], workdir: Path
) -> None:
    with HostWatch() as watch:
        outcome = attack(
            workdir,
            image_plugin(fixture_images["fork-bomb"], {"seconds": 3}),
            on_start=watch.on_start,
        )
    expect(
        outcome,
        "reader",
        "pids",
        "process limit 128 reached",
        "fix: raise `source.reader.resources.pids` (now 128)",
    )
    observed = outcome.observed("pids")
    assert observed["fork"] == "EAGAIN"
    assert observed["thread"] == "RuntimeError"  # "can't start new thread"
    assert observed["visible_processes"] <= 128
    assert max(watch.latencies) < 2.0, f"the host stalled: {max(watch.latencies):.2f} s"


@pytest.mark.parametrize("where", ["main", "child"])
def test_memory_bomb_is_oom_killed_and_reported(
    fixture_images: dict[str, str], workdir: Path, where: str
) -> None:
    outcome = attack(workdir, image_plugin(fixture_images["memory-bomb"], {"where": where}))
    expect(
        outcome,
        "reader",
        "memory",
        "memory limit 1GiB exceeded (OOM killed)",
        "fix: raise `source.reader.resources.memory` (now 1GiB)",
    )
    if where == "child":
        # Its main process survived the child's death and ended the stream as if all were well:
        # the supervisor saw the OOM kill anyway, and killed the rest itself.
        assert outcome.started["reader"].killed  # type: ignore[attr-defined]


def test_cpu_spin_is_throttled_to_its_quota_and_timed_out(
    fixture_images: dict[str, str], workdir: Path
) -> None:
    """Quota 0.5 CPU (not the default 1), so that four spinning processes exceed it even on a
    busy 2-CPU host (the throttling shows); timeout 6 s instead of 1 h, for speed."""
    with HostWatch() as watch:
        outcome = attack(
            workdir,
            image_plugin(
                fixture_images["cpu-spin"],
                {"processes": 4},
                resources={"timeout": "6s", "cpus": 0.5},
            ),
            on_start=watch.on_start,
        )
    expect(
        outcome,
        "reader",
        "timeout",
        "ran longer than its wall-clock limit of 6 s, CPU-bound",
        "of its quota of 0.5",
        "raise `source.reader.resources.timeout`, or `source.reader.resources.cpus`",
    )
    assert outcome.seconds < 6 + 15
    assert len(watch.samples) >= 4, "the plugin's cgroup was never readable"
    (t0, first), (t1, last) = watch.samples[0], watch.samples[-1]
    cpus_used = (last["cpu_usage_usec"] - first["cpu_usage_usec"]) / 1e6 / (t1 - t0)
    assert 0.3 < cpus_used < 0.6, f"used {cpus_used:.2f} CPUs with a quota of 0.5"
    periods = last["nr_periods"] - first["nr_periods"]
    throttled = last["nr_throttled"] - first["nr_throttled"]
    assert throttled > 0, f"never throttled in {periods} periods"
    assert max(watch.latencies) < 1.0, f"the host stalled: {max(watch.latencies):.2f} s"


def test_root_filesystem_is_read_only(fixture_images: dict[str, str], workdir: Path) -> None:
    outcome = attack(workdir, image_plugin(fixture_images["disk-fill"], {"target": "root"}))
    observed = outcome.observed()
    creates = observed["create"]
    assert set(creates.values()) <= REFUSED, creates
    for place in ("/", "/etc", "/usr", "/usr/local/bin", "/var/tmp", "/home", "/run/dativo"):
        assert creates[place] == "EROFS", creates
    assert observed["overwrite_code"] in {"EROFS", "EACCES"}  # an existing root-owned file
    assert observed["creatable_mount_roots"] == ["/dev/mqueue", "/dev/shm", "/tmp"]


def test_tmp_and_shm_fill_up_at_their_size(fixture_images: dict[str, str], workdir: Path) -> None:
    outcome = attack(workdir, image_plugin(fixture_images["disk-fill"], {"target": "tmp"}))
    observed = outcome.observed()
    for place in ("/tmp", "/dev/shm"):  # /tmp: `resources.tmpfs`; /dev/shm: Docker's 64 MiB
        assert observed[place]["stopped_by"] == "ENOSPC", observed
        assert 63 << 20 <= observed[place]["bytes"] <= 64 << 20, observed


@pytest.fixture
def abstract_listener() -> Iterator[tuple[str, socket.socket]]:
    """An abstract Unix socket listening in the host's network namespace."""
    name = f"dativo-test-{secrets.token_hex(6)}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + name)
    listener.listen(4)
    listener.setblocking(False)
    yield name, listener
    listener.close()


def test_no_network_way_out(
    fixture_images: dict[str, str], workdir: Path, abstract_listener: tuple[str, socket.socket]
) -> None:
    name, listener = abstract_listener
    outcome = attack(workdir, image_plugin(fixture_images["exfiltrate"], {"abstract_socket": name}))
    observed = outcome.observed()
    assert observed["interfaces"] == ["lo"]
    for destination, result in observed["tcp"].items():
        expected = "ECONNREFUSED" if destination.startswith("127.") else "ENETUNREACH"
        assert result == expected, (destination, result)
    assert observed["tcp6"] in {"ENETUNREACH", "EADDRNOTAVAIL"}
    assert set(observed["udp"].values()) == {"ENETUNREACH"}
    assert set(observed["dns"].values()) <= {"EAI_AGAIN", "EAI_NONAME", "EAI_FAIL"}
    assert observed["raw_icmp"] == observed["packet"] == "EPERM"
    assert observed["abstract_unix"] == "ECONNREFUSED"  # the host's listener is not reachable
    with pytest.raises(BlockingIOError):
        listener.accept()
    assert observed["docker_sock"] == observed["containerd_sock"] == "ENOENT"


def test_host_files_and_engine_socket_are_out_of_reach(
    fixture_images: dict[str, str], workdir: Path
) -> None:
    canary = workdir / f"canary-{secrets.token_hex(8)}.txt"
    canary.write_text("host secret\n")
    outcome = attack(
        workdir, image_plugin(fixture_images["host-files"], {"canary_path": str(canary)})
    )
    observed = outcome.observed()
    assert not any(observed["exists"].values()), observed["exists"]
    assert observed["canary_at_host_path"] is False
    assert observed["canary_found"] == []
    assert observed["files_scanned"] > 1000  # it did look everywhere
    assert observed["read_shadow"] in {"EACCES", "ENOENT"}
    assert observed["open_by_handle_at"] == "EPERM"
    # Only files the engine writes for every container, its init, and the socket directory.
    allowed = {"/etc/hostname", "/etc/hosts", "/etc/resolv.conf", "/usr/sbin/docker-init"}
    mounts = set(observed["host_backed_mounts"])
    assert "/run/dativo" in mounts
    assert mounts - {"/run/dativo"} <= allowed, mounts
    assert canary.read_text() == "host secret\n"


def test_proc_and_sys_show_nothing_of_the_host(
    fixture_images: dict[str, str], workdir: Path
) -> None:
    outcome = attack(workdir, image_plugin(fixture_images["proc-sys"]))
    observed = outcome.observed()
    assert set(observed["processes"]) <= {"docker-init", "python3"}, observed["processes"]
    assert len(observed["processes"]) <= 4
    assert set(observed["write"].values()) <= REFUSED, observed["write"]
    for path in ("/proc/sys/kernel/core_pattern", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        assert observed["write"][path] in {"EROFS", "ENOENT"}, (path, observed["write"][path])
    for path, result in observed["read"].items():
        assert result in {"ENOENT", "EPERM", "EACCES", "empty"}, (path, result)
    assert observed["kallsyms_addresses_zero"] is True
    assert observed["firmware_entries"] == 0
    assert "ro" in observed["mount_options"]["/sys"].split(",")
    assert "ro" in observed["mount_options"]["/proc/sys"].split(",")
    assert observed["mount"] == observed["unshare_user"] == observed["unshare_mount"] == "EPERM"


def test_no_privilege_escalation(fixture_images: dict[str, str], workdir: Path) -> None:
    outcome = attack(workdir, image_plugin(fixture_images["escalate"]))
    observed = outcome.observed()
    status = observed["status"]
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert status[key] == "0000000000000000", (key, status[key])
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"
    assert status["Uid"] == "65534 65534 65534 65534"
    assert observed["setuid_0"] == observed["setgid_0"] == observed["setgroups_0"] == "EPERM"
    # The image's own setuid-root binary is there, and gives nothing (no_new_privs).
    assert observed["setuid_files"] == ["/usr/local/bin/suid-id"]
    assert "uid=65534" in observed["suid_id"]
    assert "euid=0" not in observed["suid_id"]
    # So are file capabilities: the kernel refuses the exec, or grants nothing.
    assert observed["planted_file_caps"] == "ok"
    cap_python = observed["cap_python"]
    assert cap_python == "EPERM" or '"CapEff": ["0000000000000000"]' in cap_python, cap_python
    assert observed["exec_from_tmp"] == "EACCES"  # /tmp is noexec
    assert observed["unshare_user"] == "EPERM"
    assert observed["write_passwd"] in {"EROFS", "EACCES"}
