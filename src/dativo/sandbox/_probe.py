"""Proof that the engine enforces every limit, measured from inside a probe container."""

from __future__ import annotations

import json
from typing import Any

from dativo.errors import EngineError

PROBE_VERSION = "1"

# Runs inside the plugin image, under exactly the hardening plugins get; prints one JSON line.
PROBE_SCRIPT = r"""
import json, os
def read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None
out = {
    "v1_memory": read("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
    "v1_memsw": read("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes"),
    "v1_quota": read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
        or read("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us"),
    "v1_period": read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
        or read("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us"),
    "v1_pids": read("/sys/fs/cgroup/pids/pids.max"),
    "v2_memory": read("/sys/fs/cgroup/memory.max"),
    "v2_swap": read("/sys/fs/cgroup/memory.swap.max"),
    "v2_cpu": read("/sys/fs/cgroup/cpu.max"),
    "v2_pids": read("/sys/fs/cgroup/pids.max"),
    "uid": os.getuid(),
    "net": sorted(os.listdir("/sys/class/net")),
}
status = {}
for line in open("/proc/self/status"):
    key, _, value = line.partition(":")
    status[key] = value.strip()
out["cap_eff"] = status.get("CapEff")
out["no_new_privs"] = status.get("NoNewPrivs")
out["seccomp"] = status.get("Seccomp")
try:
    open("/dativo-probe", "w").close()
    out["root_writable"] = True
except OSError:
    out["root_writable"] = False
print(json.dumps(out))
"""


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def check_probe(output: str, *, memory: int, cpus: float, pids: int, uid: int) -> dict[str, Any]:
    """Compare what the probe saw with what was asked; raise EngineError on any gap.

    Returns:
        The parsed probe facts, for the cache and the run report.
    """
    lines = [line for line in output.splitlines() if line.startswith("{")]
    if not lines:
        raise EngineError(f"the limits probe printed no result: {output[-500:]}")
    facts: dict[str, Any] = json.loads(lines[-1])
    problems: list[str] = []
    v2 = facts.get("v2_memory") is not None and facts.get("v1_memory") is None

    mem = _int(facts["v2_memory"] if v2 else facts["v1_memory"])
    if mem != memory:
        problems.append(f"memory limit: asked {memory} bytes, the container sees `{mem}`")
    if v2:
        swap = facts.get("v2_swap")
        if swap is None or _int(swap) != 0:
            problems.append(
                f"swap limit: asked none, the container sees `{swap}` (swap accounting is off)"
            )
    else:
        memsw = _int(facts.get("v1_memsw"))
        if memsw != memory:
            problems.append(
                "memory+swap limit: the engine cannot cap swap (memory.memsw is "
                f"`{facts.get('v1_memsw')}`); enable swap accounting (kernel `swapaccount=1`)"
            )
    if v2:
        quota, _, period = (facts.get("v2_cpu") or "").partition(" ")
        q2, p2 = _int(quota), _int(period)
        got_cpus = q2 / p2 if q2 and p2 else None
    else:
        q, p = _int(facts.get("v1_quota")), _int(facts.get("v1_period"))
        got_cpus = q / p if q and p and q > 0 else None
    if got_cpus is None or abs(got_cpus - cpus) > 0.01:
        problems.append(f"CPU quota: asked {cpus} CPUs, the container sees `{got_cpus}`")
    got_pids = _int(facts["v2_pids"] if v2 else facts["v1_pids"])
    if got_pids != pids:
        problems.append(f"process limit: asked {pids}, the container sees `{got_pids}`")
    if facts.get("cap_eff") != "0000000000000000":
        problems.append(f"capabilities: expected none, CapEff is `{facts.get('cap_eff')}`")
    if facts.get("no_new_privs") != "1":
        problems.append("no-new-privileges is not in force")
    if facts.get("seccomp") != "2":
        problems.append(f"seccomp filtering is off (Seccomp `{facts.get('seccomp')}`)")
    if facts.get("uid") != uid:
        problems.append(f"user: expected uid {uid}, the plugin runs as {facts.get('uid')}")
    if facts.get("root_writable"):
        problems.append("the root filesystem is writable")
    if facts.get("net") != ["lo"]:
        problems.append(f"network: expected only loopback, the container has {facts.get('net')}")
    if problems:
        raise EngineError(
            "the Docker engine does not enforce every sandbox control, so Dativo refuses to "
            "run plugins:\n  - " + "\n  - ".join(problems)
        )
    return facts
