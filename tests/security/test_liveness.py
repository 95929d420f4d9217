"""Hostile plugins against the supervisor's liveness and bookkeeping: hangs, endless streams,
log floods, crashes, tricks in the socket and staging directories.

Deadlines are shortened for speed where the default would make a test wait (handshake 2 s
instead of 30 s, idle 2 s instead of 5 min, wall clock 4 s instead of 1 h); every test says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import docker
import pytest

from dativo.sandbox import LABEL_RUN_DIR
from tests.security._attack import attack, expect, image_plugin

pytestmark = [pytest.mark.security, pytest.mark.docker]

GENERATE = {"type": "builtin", "name": "generate", "config": {"rows": 10_000, "columns": 3}}


def test_hang_before_connecting(fixture_images: dict[str, str], workdir: Path) -> None:
    """Handshake timeout 2 s instead of 30 s."""
    outcome = attack(
        workdir,
        image_plugin(fixture_images["hang-connect"]),
        run={"handshake_timeout": "2s"},
    )
    expect(
        outcome,
        "reader",
        "handshake",
        "did not connect within the handshake timeout of 2 s",
        "fix: raise `run.handshake_timeout`",
    )
    assert outcome.seconds < 2 + 15


def test_hang_before_hello(fixture_images: dict[str, str], workdir: Path) -> None:
    """Handshake timeout 2 s instead of 30 s."""
    outcome = attack(
        workdir, image_plugin(fixture_images["hang-hello"]), run={"handshake_timeout": "2s"}
    )
    expect(
        outcome,
        "reader",
        "handshake",
        "connected but sent no hello within 2 s",
        "fix: raise `run.handshake_timeout`, or check that the plugin speaks protocol v1",
    )


def test_hang_mid_stream_hits_the_idle_limit(fixture_images: dict[str, str], workdir: Path) -> None:
    """Idle limit 2 s instead of 5 min; the wall clock stays at its default of 1 h."""
    outcome = attack(
        workdir, image_plugin(fixture_images["hang-stream"]), run={"idle_timeout": "2s"}
    )
    expect(
        outcome,
        "reader",
        "timeout",
        "sent nothing for 2 s (the idle limit)",
        "fix: raise `run.idle_timeout`",
    )
    assert outcome.seconds < 2 + 15


@pytest.mark.parametrize(
    ("run", "message", "setting"),
    [
        (
            {"max_rows": 200_000},
            "sent more than the 200,000 rows `run.max_rows` allows",
            "max_rows",
        ),
        ({"max_bytes": "8MiB"}, "sent more than the 8MiB of record batches", "max_bytes"),
    ],
    ids=["max_rows", "max_bytes"],
)
def test_endless_stream_stops_at_its_cap(
    fixture_images: dict[str, str], workdir: Path, run: dict[str, Any], message: str, setting: str
) -> None:
    outcome = attack(workdir, image_plugin(fixture_images["endless-stream"]), run=run)
    expect(outcome, "reader", "limit", message, f"fix: raise `run.{setting}`")


def test_endless_stream_stops_at_its_wall_clock(
    fixture_images: dict[str, str], workdir: Path
) -> None:
    """No cap: the wall clock, 4 s instead of 1 h, ends a reader that never pauses."""
    outcome = attack(
        workdir,
        image_plugin(fixture_images["endless-stream"], resources={"timeout": "4s"}),
        writer={"type": "builtin", "name": "null"},
    )
    expect(
        outcome,
        "reader",
        "timeout",
        "ran longer than its wall-clock limit of 4 s",
        "fix: raise `source.reader.resources.timeout`",
    )
    assert outcome.seconds < 4 + 15


def _vm_rss_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_log_flood_is_rate_limited_and_bounded(
    fixture_images: dict[str, str], workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """20,000 log messages of 1 KB with forged terminal output, 16 MiB on stdout and stderr."""
    client = docker.from_env()
    log_sizes: list[int] = []
    stop = threading.Event()

    def watch_logs(process: Any) -> None:
        path = Path(client.api.inspect_container(process.container.id)["LogPath"])

        def sample() -> None:
            while not stop.is_set():
                total = 0
                for file in path.parent.glob(path.name + "*"):
                    with contextlib.suppress(OSError):  # rotated away meanwhile
                        total += file.stat().st_size
                log_sizes.append(total)
                stop.wait(0.1)

        if process.launch.role == "reader":
            threading.Thread(target=sample, daemon=True).start()

    rss_before = _vm_rss_mib()
    caplog.set_level(logging.DEBUG, logger="dativo")
    try:
        outcome = attack(
            workdir,
            image_plugin(fixture_images["log-flood"], {"messages": 20_000, "output_mib": 16}),
            on_start=watch_logs,
        )
    finally:
        stop.set()
    error = expect(outcome, "reader", "plugin", "OBSERVED")
    assert outcome.observed()["messages"] == 20_000
    plugin_records = [r for r in caplog.records if r.name == "dativo.plugin"]
    # A burst of 200, then 50 a second: the rest was dropped, and the count reported.
    assert 200 <= len(plugin_records) <= 200 + 50 * outcome.seconds + 10
    dropped = [
        r.getMessage() for r in caplog.records if "log messages over the rate" in r.getMessage()
    ]
    assert dropped, "the dropped messages were not reported"
    count = int(dropped[0].split("dropped ")[1].split()[0])
    assert count == 20_000 - len(plugin_records)
    # Nothing the plugin wrote reaches a terminal raw: no escape, no line break, no bidi mark.
    for record in plugin_records:
        text = record.getMessage()
        assert not any(ch in text for ch in "\x1b\r\n\u202e"), repr(text[:120])
    assert "\x1b" not in str(error)
    assert "\u202e" not in str(error)
    # The engine kept at most 2 x 1 MiB of the container's output.
    assert log_sizes, "the container's log files were never seen"
    assert max(log_sizes) <= 2 * (1 << 20) + (256 << 10), max(log_sizes)
    assert _vm_rss_mib() - rss_before < 100, "the supervisor's memory grew with the flood"


def test_crash_mid_batch(fixture_images: dict[str, str], workdir: Path) -> None:
    outcome = attack(workdir, image_plugin(fixture_images["crash-mid-batch"]))
    expect(
        outcome,
        "reader",
        "crash",
        "closed the connection before `end`: the plugin was killed (SIGSEGV, exit 139)",
    )


def test_socket_directory_cannot_be_changed_and_is_never_followed(
    fixture_images: dict[str, str], workdir: Path
) -> None:
    """Inside, the plugin cannot touch its socket directory. Outside, the test plants symlinks
    there itself (as if the mount were writable): the supervisor never follows them, and its
    cleanup removes the links, not what they point at."""
    canary = workdir / "canary"
    canary.mkdir()
    (canary / "precious").write_text("do not delete\n")
    client = docker.from_env()

    def plant(process: Any) -> None:
        labels = client.api.inspect_container(process.container.id)["Config"]["Labels"]
        run_dir = Path(labels[LABEL_RUN_DIR])
        socket_dir = run_dir / process.launch.role
        os.symlink(canary, socket_dir / "evil-dir")
        os.symlink(canary / "precious", socket_dir / "evil-file")
        if process.launch.role == "reader":
            os.symlink(canary, run_dir / "evil-run-link")

    outcome = attack(workdir, image_plugin(fixture_images["socket-symlink"]), on_start=plant)
    observed = outcome.observed()
    for attempt in ("symlink", "symlink_over_socket", "rename_socket", "unlink_socket"):
        assert observed[attempt] == "EROFS", (attempt, observed[attempt])
    assert observed["mkdir"] == observed["bind"] == "EROFS"
    assert observed["second_connection"] == "ECONNREFUSED"  # one connection per plugin, ever
    assert "plugin.sock" in observed["listing"]
    assert (canary / "precious").read_text() == "do not delete\n"


@pytest.mark.parametrize("trick", ["symlink", "symlink-dir"])
def test_writer_staging_links_are_refused(
    fixture_images: dict[str, str], workdir: Path, trick: str
) -> None:
    outcome = attack(
        workdir,
        GENERATE,
        image_plugin(fixture_images["staging-tricks"], {"trick": trick}),
    )
    expect(outcome, "writer", "result", "cannot be opened safely")


def test_writer_staging_fifo_does_not_block_the_supervisor(
    fixture_images: dict[str, str], workdir: Path
) -> None:
    outcome: list[Any] = []
    runner = threading.Thread(
        target=lambda: outcome.append(
            attack(
                workdir,
                GENERATE,
                image_plugin(fixture_images["staging-tricks"], {"trick": "fifo"}),
            )
        ),
        daemon=True,
    )
    runner.start()
    runner.join(15)
    hung = runner.is_alive()
    if hung:
        # Unblock it: open the FIFO's writing end, so that the supervisor's open returns.
        for fifo in (workdir / "out" / ".dativo-staging").glob("*/data.parquet"):
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            time.sleep(0.5)
            os.close(fd)
        runner.join(60)
    assert outcome, "the run did not finish"
    assert not hung, "the supervisor blocked opening a FIFO the writer staged"
    expect(outcome[0], "writer", "result", "not a regular file")
