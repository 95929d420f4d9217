"""The limit probe's verdicts: every control must be seen in force, or nothing runs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dativo.errors import EngineError
from dativo.sandbox._probe import check_probe

GOOD_V1: dict[str, Any] = {
    "v1_memory": str(96 << 20),
    "v1_memsw": str(96 << 20),
    "v1_quota": "50000",
    "v1_period": "100000",
    "v1_pids": "48",
    "v2_memory": None,
    "uid": 65534,
    "net": ["lo"],
    "cap_eff": "0000000000000000",
    "no_new_privs": "1",
    "seccomp": "2",
    "root_writable": False,
}
GOOD_V2: dict[str, Any] = {
    **{k: v for k, v in GOOD_V1.items() if not k.startswith("v1_")},
    "v1_memory": None,
    "v2_memory": str(96 << 20),
    "v2_swap": "0",
    "v2_cpu": "50000 100000",
    "v2_pids": "48",
}


def check(facts: dict[str, Any]) -> dict[str, Any]:
    return check_probe(json.dumps(facts), memory=96 << 20, cpus=0.5, pids=48, uid=65534)


@pytest.mark.parametrize("facts", [GOOD_V1, GOOD_V2], ids=["cgroup-v1", "cgroup-v2"])
def test_enforced_limits_pass(facts: dict[str, Any]) -> None:
    assert check(facts)["uid"] == 65534


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"v1_memsw": None}, "cannot cap swap"),
        ({"v1_memory": "9223372036854771712"}, "memory limit"),
        ({"v1_quota": "-1"}, "CPU quota"),
        ({"v1_pids": "max"}, "process limit"),
        ({"cap_eff": "00000000a80425fb"}, "capabilities"),
        ({"no_new_privs": "0"}, "no-new-privileges"),
        ({"seccomp": "0"}, "seccomp"),
        ({"uid": 0}, "expected uid 65534"),
        ({"root_writable": True}, "root filesystem is writable"),
        ({"net": ["eth0", "lo"]}, "only loopback"),
    ],
)
def test_each_missing_control_refuses_to_run(change: dict[str, Any], message: str) -> None:
    with pytest.raises(EngineError, match="refuses to run plugins") as caught:
        check({**GOOD_V1, **change})
    assert message in str(caught.value)


def test_v2_without_swap_limit_refused() -> None:
    with pytest.raises(EngineError, match="swap limit"):
        check({**GOOD_V2, "v2_swap": "max"})


def test_probe_without_output_refused() -> None:
    with pytest.raises(EngineError, match="printed no result"):
        check_probe("Traceback ...", memory=1, cpus=1, pids=1, uid=1)
