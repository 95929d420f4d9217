"""Lake commit benchmark: the cost of committing to Iceberg, against plain Parquet.

`make bench-lake` (or `.venv/bin/python bench/lake.py`) runs, in one go, the same job twice
over: `generate` (--rows rows x --columns mixed columns) -> built-in `parquet` writer, each
plugin in its own container, with

1. parquet  `target.path: <dir>`: the staged files are renamed into the target (the baseline);
2. iceberg  `format: iceberg`: a SQLite catalog and a local warehouse, mode `append`; the table
            is created by a warm-up run, so the measured runs are steady-state appends.

Each is `dativo run JOB --json REPORT` as a subprocess, best of --repeat (runs alternate, so a
noisy moment hits both). Figures:

- `commit_seconds`: the run report's `commit_seconds`, measured inside the supervisor from the
  verified staged files to the saved state (Iceberg: check, journal, move, catalog commit,
  state; Parquet: journal, renames, state); the median of the runs;
- rows/s of the whole run: rows / wall time of the `dativo run` process (start-up, containers,
  stream, commit, cleanup);
- `ratio`: Iceberg rows/s / Parquet rows/s, best against best (goal: at least 0.8).

The last line of stdout is `RESULT {json}`; progress goes to stderr. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import PYTHON, emit_result, machine_info, progress, run_child, table


def job_yaml(kind: str, *, rows: int, columns: int, workdir: Path) -> str:
    resources = "{cpus: 1, memory: 1GiB}"
    if kind == "iceberg":
        target = "  format: iceberg\n  iceberg: {table: bench}\n"
    else:
        target = f"  path: {workdir / 'parquet-out'}\n"
    return f"""\
version: 1
name: bench-lake-{kind}
source:
  reader:
    type: builtin
    name: generate
    config: {{rows: {rows}, columns: {columns}, seed: 0}}
    resources: {resources}
target:
{target}  writer:
    type: builtin
    name: parquet
    config: {{compression: zstd}}
    resources: {resources}
"""


def run_once(workdir: Path, kind: str, args: argparse.Namespace, label: str) -> dict[str, Any]:
    job = workdir / f"{kind}.yaml"
    if not job.exists():
        job.write_text(job_yaml(kind, rows=args.rows, columns=args.columns, workdir=workdir))
    report_path = workdir / f"report-{kind}.json"
    progress(f"{kind}: {args.rows:,} rows, {label}")
    child = run_child(
        [PYTHON, "-m", "dativo", "run", str(job), "--json", str(report_path), "--quiet"],
        timeout=args.timeout,
    ).check()
    report = json.loads(report_path.read_text())
    if report.get("status") != "succeeded" or report.get("rows") != args.rows:
        raise RuntimeError(f"unexpected report: {json.dumps(report)[:2000]}")
    if kind == "iceberg" and not (report.get("commit") or {}).get("committed"):
        raise RuntimeError(f"nothing committed: {json.dumps(report)[:2000]}")
    return {
        "kind": kind,
        "wall_seconds": child.wall_seconds,
        "run_seconds": report["seconds"],
        "stream_seconds": report["stream_seconds"],
        "commit_seconds": report["commit_seconds"],
        "rows_per_s": args.rows / child.wall_seconds,
        "files": len(report["files"]),
        "rss_mb": child.peak_rss_mb,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=2_000_000, help="rows per run")
    p.add_argument("--columns", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3, help="measured runs of each (best is kept)")
    p.add_argument("--timeout", type=float, default=600.0, help="per `dativo run` (seconds)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return measure(args)
    except (RuntimeError, OSError) as exc:
        print(f"bench lake: failed: {exc}", file=sys.stderr)
        return 1


def measure(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    print("Lake commit benchmark: the same job into plain Parquet and into Iceberg")
    print(
        f"job: builtin `generate` ({args.rows:,} rows x {args.columns} mixed columns) -> builtin "
        "`parquet` (zstd); cpus 1, memory 1GiB per plugin; Iceberg: SQLite catalog, local "
        "warehouse, mode append"
    )
    print()
    runs: dict[str, list[dict[str, Any]]] = {"parquet": [], "iceberg": []}
    with tempfile.TemporaryDirectory(prefix="dativo-bench-lake-") as tmp:
        workdir = Path(tmp)
        # Warm-up: images, page cache, and the Iceberg table's creation (not measured).
        for kind in ("parquet", "iceberg"):
            run_once(workdir, kind, args, "warm-up")
        for i in range(args.repeat):
            for kind in ("parquet", "iceberg"):
                runs[kind].append(run_once(workdir, kind, args, f"run {i + 1}/{args.repeat}"))

    best = {kind: max(r, key=lambda x: x["rows_per_s"]) for kind, r in runs.items()}
    commit = {kind: statistics.median(x["commit_seconds"] for x in r) for kind, r in runs.items()}
    ratio = best["iceberg"]["rows_per_s"] / best["parquet"]["rows_per_s"]
    rows = [
        [
            kind,
            best[kind]["rows_per_s"],
            best[kind]["wall_seconds"],
            best[kind]["run_seconds"],
            best[kind]["stream_seconds"],
            commit[kind],
            " ".join(f"{x['commit_seconds']:.3f}" for x in runs[kind]),
            best[kind]["files"],
            best[kind]["rss_mb"],
        ]
        for kind in ("parquet", "iceberg")
    ]
    print(
        table(
            [
                "target",
                "rows/s (wall)",
                "wall s",
                "run s",
                "stream s",
                "commit s (median)",
                "commit s (runs)",
                "files",
                "RSS MiB",
            ],
            rows,
        )
    )
    print()
    goal = "met" if ratio >= 0.8 else "NOT met"
    print(
        f"Iceberg commit: {commit['iceberg']:.3f} s per commit (Parquet publish: "
        f"{commit['parquet']:.3f} s); ratio Iceberg / Parquet rows/s = {ratio:.3f} "
        f"(goal >= 0.8: {goal})"
    )
    emit_result(
        "lake",
        {
            "commit_seconds": round(commit["iceberg"], 4),
            "parquet_publish_seconds": round(commit["parquet"], 4),
            "ratio": round(ratio, 3),
            "iceberg_rows_per_s": round(best["iceberg"]["rows_per_s"]),
            "parquet_rows_per_s": round(best["parquet"]["rows_per_s"]),
            "iceberg_wall_seconds": round(best["iceberg"]["wall_seconds"], 3),
            "parquet_wall_seconds": round(best["parquet"]["wall_seconds"], 3),
            "rows": args.rows,
            "columns": args.columns,
            "repeat": args.repeat,
            "elapsed_seconds": round(time.perf_counter() - started, 1),
            **machine_info(),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
