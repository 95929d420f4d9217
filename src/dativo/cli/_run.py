"""`dativo run`: run a job, show progress, print a summary and optionally a JSON report."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from dativo.config import format_size, load_job
from dativo.errors import DativoError

_BANNER = (
    "!! UNSANDBOXED: --in-process runs plugins inside this process with your privileges.\n"
    "!! No container, no limits, no network policy. Use it only for plugins you wrote."
)


def register(commands: Any) -> None:
    parser = commands.add_parser("run", help="run a job once")
    parser.add_argument("job", type=Path, help="the job file (YAML)")
    parser.add_argument(
        "--json",
        metavar="FILE",
        help="write the machine-readable run report to FILE (`-` for stdout)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="UNSANDBOXED trusted mode: run plugins in this process (plugin development)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.set_defaults(func=_run)


class _ProgressLine:
    """A single terminal line, redrawn at most 5 times a second."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._last = 0.0

    def __call__(self, progress: Any) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._last < 0.2:
            return
        self._last = now
        rate = progress.rows / progress.seconds if progress.seconds else 0.0
        mb = progress.bytes / 1e6
        mbps = mb / progress.seconds if progress.seconds else 0.0
        sys.stderr.write(
            f"\r  {progress.rows:>12,} rows  {mb:>9,.1f} MB  {rate:>11,.0f} rows/s  "
            f"{mbps:>7,.1f} MB/s"
        )
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self._last:
            sys.stderr.write("\n")


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _write_report(target: str, report: dict[str, Any]) -> None:
    text = json.dumps(report, indent=2, sort_keys=True)
    if target == "-":
        print(text)
    else:
        Path(target).write_text(text + "\n")


def _run(args: argparse.Namespace) -> int:
    from dativo.supervisor import RunOptions, RunReport, describe_error, run_job

    job = load_job(args.job)
    if args.in_process:
        print(_BANNER, file=sys.stderr)
    # SIGTERM gets the same cleanup as Ctrl-C: containers removed, nothing published.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    line = _ProgressLine(enabled=sys.stderr.isatty() and not args.quiet)
    options = RunOptions(in_process=args.in_process, progress=line)
    report: RunReport | None = None
    try:
        report = run_job(job, options)
    except DativoError as exc:
        line.done()
        if args.json:
            _write_report(
                args.json,
                {
                    "job": job.name,
                    "status": "failed",
                    "error": {"type": type(exc).__name__, "message": str(exc)},
                },
            )
        print(f"error: run of `{job.name}` failed\n{describe_error(exc)}", file=sys.stderr)
        return 1
    line.done()
    data = report.to_json()
    if args.json:
        _write_report(args.json, data)
    if args.json != "-":
        rate = data["rows_per_second"] or 0
        print(
            f"ok: {job.name}: {report.rows:,} rows, {format_size(report.bytes)} of Arrow, "
            f"{len(report.files)} file(s) in {report.seconds:.1f} s ({rate:,} rows/s); "
            f"run {report.run_id}"
            + ("" if report.sandboxed else " [UNSANDBOXED]")
            + ("" if report.signed or not report.sandboxed else " [UNSIGNED]")
        )
        for entry in report.files[:10]:
            print(f"  {entry['path']}  {entry['rows']:,} rows  {format_size(entry['bytes'])}")
        if len(report.files) > 10:
            print(f"  ... and {len(report.files) - 10} more")
        commit = report.commit or {}
        if commit.get("format") == "iceberg":
            done = (
                f"committed as snapshot {commit.get('snapshot_id')}"
                if commit.get("committed")
                else "nothing to commit"
            )
            print(
                f"  iceberg: table {commit.get('table')} ({commit.get('mode')}): {done} "
                f"in {report.commit_seconds or 0:.3f} s"
            )
        elif commit.get("location"):
            print(f"  uploaded {commit.get('objects', 0)} object(s) to {commit['location']}")
        for role, plugin in data["plugins"].items():
            for destination, stats in (plugin.get("network") or {}).items():
                failed = stats["failed_connects"] + stats["refused_over_limit"]
                print(
                    f"  network: {role} -> {destination}: {stats['connections']} connection(s), "
                    f"{format_size(stats['bytes_in'])} in, {format_size(stats['bytes_out'])} out"
                    + (f", {failed} failed" if failed else "")
                )
    return 0
