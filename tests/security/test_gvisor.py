"""gVisor (`runsc`) as a plugin's runtime (`isolation.runtime: runsc`).

runsc runs here, and carries the plugin's Unix socket (registered with `--host-uds=open`), but
Dativo cannot prove its limits inside it (docs/threat-model.md, "gVisor"). The run must then
be refused before any plugin starts (fail closed), never run with weaker limits.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from dativo.errors import EngineError
from tests.security._attack import attack, image_plugin

pytestmark = [pytest.mark.security, pytest.mark.docker]


def runsc_registered() -> bool:
    proc = subprocess.run(
        ["docker", "info", "--format", "{{json .Runtimes}}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return "runsc" in json.loads(proc.stdout or "{}")


def test_gvisor_runtime_is_refused_until_its_limits_can_be_proved(
    fixture_images: dict[str, str], workdir: Path
) -> None:
    outcome = attack(
        workdir, image_plugin(fixture_images["proc-sys"], isolation={"runtime": "runsc"})
    )
    assert isinstance(outcome.error, EngineError), repr(outcome.error)
    if runsc_registered():
        assert "under the `runsc` runtime" in str(outcome.error) or (
            "does not enforce every sandbox control" in str(outcome.error)
        )
    else:
        # Without gVisor installed the engine refuses the runtime: still nothing starts.
        assert "runsc" in str(outcome.error)
    assert outcome.started == {}, "a plugin started although its limits were not proved"
