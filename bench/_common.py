"""Helpers shared by the benchmarks in `bench/`: timing, peak RSS of a child, tables, RESULT.

Every benchmark is a plain script (`python bench/NAME.py`, or `make bench-NAME`) that:

- prints its progress on stderr (`progress`), so stdout holds only the report;
- measures what it is about *and* a baseline in the same run, on the same machine, so the
  figures can be compared with each other even when the machine is noisy;
- prints a human-readable table (`table`) and, as its very last line of stdout, exactly one
  `RESULT {json}` line (`emit_result`) that tools can parse.

Benchmarks never assert on timings: they measure and report.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "GB",
    "MIB",
    "PYTHON",
    "ROOT",
    "ChildRun",
    "best_of",
    "emit_result",
    "gbps",
    "machine_info",
    "progress",
    "run_child",
    "table",
]

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
GB = 1e9  # throughputs are reported in decimal GB/s
MIB = 1 << 20
_TERM_GRACE = 20.0

T = TypeVar("T")


def progress(message: str) -> None:
    """One progress line on stderr (stdout is kept for the report and the RESULT line)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def gbps(nbytes: float, seconds: float) -> float:
    """Decimal gigabytes per second (0 when nothing was timed)."""
    return nbytes / seconds / GB if seconds > 0 else 0.0


def best_of(n: int, measure: Callable[[int], T], key: Callable[[T], float]) -> tuple[T, list[T]]:
    """Call `measure(i)` for i in 0..n-1; return the result with the highest `key`, and all."""
    results = [measure(i) for i in range(n)]
    return max(results, key=key), results


@dataclass(frozen=True)
class ChildRun:
    """How one child process ended, and what it cost."""

    args: tuple[str, ...]
    returncode: int
    wall_seconds: float
    peak_rss_kib: int  # ru_maxrss of the child itself (plus any children it waited for)
    user_seconds: float
    system_seconds: float
    stdout: str
    stderr: str

    @property
    def peak_rss_mb(self) -> float:
        """Peak resident set size in MiB-based megabytes (KiB / 1024)."""
        return self.peak_rss_kib / 1024

    def check(self) -> ChildRun:
        """Raise with the child's output if it failed."""
        if self.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(self.args)}` exited with status {self.returncode}\n"
                f"--- stdout\n{self.stdout[-4000:]}\n--- stderr\n{self.stderr[-4000:]}"
            )
        return self


# Runs the measured command as its own child and reports that child's rusage. Why a launcher:
# on Linux a child's ru_maxrss starts at the RSS of the process that forked it (the forked mm's
# high-water mark; with vfork/posix_spawn, the parent's *peak*), so a child spawned straight
# from a benchmark holding hundreds of MB would report at least that much. This launcher is a
# bare `python -I -S` of a few MB, which is below anything worth measuring.
_LAUNCHER = r"""
import os, sys, time
out, argv = sys.argv[1], sys.argv[2:]
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    except BaseException as exc:
        sys.stderr.write(f"cannot run {argv[0]}: {exc}\n")
    os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - started
code = os.waitstatus_to_exitcode(status)
with open(out, "w") as f:
    f.write(f"{code} {wall} {ru.ru_maxrss} {ru.ru_utime} {ru.ru_stime}")
"""


def run_child(
    args: Sequence[str],
    *,
    timeout: float | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> ChildRun:
    """Run `args` to completion; measure its wall time and peak RSS with `os.wait4`.

    Only the child and the descendants it waits for are counted: work it delegates elsewhere
    (a Docker container, a daemon) is not. Output goes to temporary files, not pipes, so a
    chatty child cannot block. On `timeout` its process group gets SIGTERM, then SIGKILL after
    a grace period; the returned run then has a negative returncode and no figures.
    """
    with (
        tempfile.TemporaryDirectory(prefix="bench-child-") as tmp,
        tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as out,
        tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as err,
    ):
        usage_path = Path(tmp) / "rusage"
        launcher = [PYTHON, "-I", "-S", "-c", _LAUNCHER, str(usage_path), *args]
        proc = subprocess.Popen(
            launcher, stdout=out, stderr=err, cwd=cwd, env=env, start_new_session=True
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # lets `dativo run` remove its containers
            try:
                proc.wait(timeout=_TERM_GRACE)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        try:
            code, wall, maxrss, utime, stime = usage_path.read_text().split()
        except (OSError, ValueError):
            return ChildRun(  # the launcher itself was killed (timeout) or failed
                args=tuple(args),
                returncode=proc.returncode or -1,
                wall_seconds=0.0,
                peak_rss_kib=0,
                user_seconds=0.0,
                system_seconds=0.0,
                stdout=stdout,
                stderr=stderr,
            )
        rss_kib = int(maxrss) // 1024 if sys.platform == "darwin" else int(maxrss)
        return ChildRun(
            args=tuple(args),
            returncode=int(code),
            wall_seconds=float(wall),
            peak_rss_kib=rss_kib,
            user_seconds=float(utime),
            system_seconds=float(stime),
            stdout=stdout,
            stderr=stderr,
        )


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table; floats are printed with 2 decimals, ints with separators."""

    def cell(value: Any) -> str:
        if isinstance(value, bool) or value is None:
            return "-" if value is None else str(value)
        if isinstance(value, float):
            return f"{value:,.2f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        first, *rest = values
        parts = [first.ljust(widths[0])] + [
            v.rjust(w) for v, w in zip(rest, widths[1:], strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(headers)), rule, *(line(r) for r in cells)])


def machine_info() -> dict[str, Any]:
    """Where and when the figures were taken."""
    model = platform.processor() or ""
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                model = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import pyarrow

        arrow = pyarrow.__version__
    except ImportError:
        arrow = None
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "load_avg": load,  # other work on the machine skews every figure; check this first
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pyarrow": arrow,
    }


def emit_result(name: str, values: dict[str, Any]) -> None:
    """Print the one machine-readable line; it must be the last line of stdout."""
    sys.stdout.flush()
    print("RESULT " + json.dumps({"name": name, **values}, sort_keys=False), flush=True)
