"""Run one hostile plugin through the real supervisor and check that it changed nothing."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker

from dativo.config import parse_job
from dativo.errors import DativoError, PluginError
from dativo.sandbox import LABEL_RUN_DIR, runtime_base
from dativo.state import StateStore
from dativo.supervisor import RunOptions, RunReport, run_job
from dativo.supervisor._plugins import PluginProcess

JOB = "attack"
SEEDED_STATE = {"cursor": "before-the-attack"}
MARKER = "OBSERVED "


@dataclass
class Outcome:
    """How a hostile run ended."""

    error: DativoError | None
    report: RunReport | None
    seconds: float
    started: dict[str, PluginProcess] = field(default_factory=dict)

    @property
    def plugin_error(self) -> PluginError:
        assert isinstance(self.error, PluginError), f"expected a PluginError, got {self.error!r}"
        return self.error

    def observed(self, rule: str = "plugin") -> dict[str, Any]:
        """The observations a probing plugin reported: it failed with its own error (rule
        `plugin`) so that nothing it staged is published, and the message carries them."""
        error = self.plugin_error
        message = error.message
        assert (error.role, error.rule) == ("reader", rule), str(error)
        assert MARKER in message, f"the plugin reported no observations: {message[:500]}"
        data: dict[str, Any] = json.loads(message.split(MARKER, 1)[1])
        return data


def image_plugin(tag: str, config: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "image", "image": tag, "config": config or {}, **extra}


def attack(
    workdir: Path,
    reader: dict[str, Any],
    writer: dict[str, Any] | None = None,
    *,
    run: dict[str, Any] | None = None,
    on_start: Callable[[PluginProcess], None] | None = None,
) -> Outcome:
    """Run `reader` into `writer` (default: the Parquet writer into `workdir/out`).

    Before: the job's state is seeded. After, whatever happened: nothing was published, the
    staging area is empty, the state is as seeded, and no container or run directory of the
    run is left.
    """
    data: dict[str, Any] = {
        "version": 1,
        "name": JOB,
        "source": {"reader": reader},
        "target": {"path": "out", "writer": writer or {"type": "builtin", "name": "parquet"}},
        "run": {"handshake_timeout": "20s", **(run or {})},
    }
    job = parse_job(data, base_dir=workdir)
    store = StateStore(job.state_path)
    store.save(JOB, dict(SEEDED_STATE), "seed")
    started: dict[str, PluginProcess] = {}

    def record(process: PluginProcess) -> None:
        started[process.launch.role] = process
        if on_start is not None:
            on_start(process)

    began = time.monotonic()
    error: DativoError | None = None
    report: RunReport | None = None
    try:
        report = run_job(job, RunOptions(on_start=record))
    except DativoError as exc:
        error = exc
    outcome = Outcome(error, report, time.monotonic() - began, started)
    assert_untouched(workdir / "out", store)
    return outcome


def published(target: Path) -> list[Path]:
    return sorted(p for p in target.rglob("*") if ".dativo-staging" not in p.parts)


def assert_untouched(target: Path, store: StateStore) -> None:
    assert published(target) == [], f"output was published: {published(target)}"
    staging = target / ".dativo-staging"
    if staging.is_dir():
        assert list(staging.iterdir()) == [], f"staging left: {list(staging.iterdir())}"
    assert store.get(JOB) == SEEDED_STATE, "the saved state changed"
    base = runtime_base()
    assert list(base.iterdir()) == [], f"run directories left in {base}"
    assert own_containers(base) == [], f"containers left: {own_containers(base)}"


def own_containers(base: Path) -> list[str]:
    """Names of the containers whose run directory lies in `base` (this session's runs).

    The low-level listing carries the labels, so nothing is inspected one by one (another
    supervisor sharing the engine may remove its containers meanwhile).
    """
    listing = docker.from_env().api.containers(
        all=True, filters={"label": "org.dativo.managed=true"}
    )
    prefix = str(base) + "/"
    return [
        (c.get("Names") or ["?"])[0].lstrip("/")
        for c in listing
        if (c.get("Labels") or {}).get(LABEL_RUN_DIR, "").startswith(prefix)
    ]


def expect(outcome: Outcome, role: str, rule: str, *fragments: str) -> PluginError:
    """The run failed with a PluginError of `role` and `rule` whose text has `fragments`."""
    error = outcome.plugin_error
    text = str(error)
    assert (error.role, error.rule) == (role, rule), f"{error.role}/{error.rule}: {text}"
    for fragment in fragments:
        assert fragment in text, f"`{fragment}` not in: {text}"
    return error
