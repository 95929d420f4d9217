"""Transport benchmark: how fast Arrow moves reader container -> supervisor -> writer container.

`make bench-transport` (or `.venv/bin/python bench/transport.py`) measures, in one run:

1. raw      the baseline: one process `sendall`s a preallocated buffer over a Unix socket to
            another that `recv_into`s a preallocated buffer (best chunk size, best of N);
2. relay    a second baseline: the same bytes framed like protocol v1 (one frame per record
            batch) through a middle Python process that does only `recv_into` + `sendmsg`,
            i.e. the two socket hops of the pipeline with no Arrow and no validation;
3. pipeline `dativo run` of a job `generate` (repeat_batch) -> `null`, each plugin in its own
            container with cpus 1: bytes of Arrow relayed / `stream_seconds` (best of N), the
            wall time of the whole command and rows/s; and the supervisor's peak RSS at
            --rows and at --big-rows rows (`os.wait4` on the `dativo run` process; the plugins
            run in containers, so they are not counted);
4. inprocess the same job with `dativo run --in-process` (plugins in threads, no containers);
5. sweep    the pipeline at several `run.batch_size` values.

The last line of stdout is `RESULT {json}`; progress goes to stderr. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    MIB,
    PYTHON,
    ChildRun,
    best_of,
    emit_result,
    gbps,
    machine_info,
    progress,
    run_child,
    table,
)

HEADER = struct.Struct("<B3xI")  # protocol v1 frame header (kind, length)
KIND_ARROW = 2


# --- baselines: plain Unix sockets -------------------------------------------------------------


def _send_all(sock: socket.socket, chunk: int, total: int) -> None:
    buf = memoryview(bytearray(chunk))
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        sock.sendall(buf[:n])
        sent += n


def _recv_all(sock: socket.socket, chunk: int) -> int:
    buf = memoryview(bytearray(chunk))
    got = 0
    while True:
        n = sock.recv_into(buf)
        if n == 0:
            return got
        got += n


def _fork(body: Any, *args: Any) -> int:
    """Run `body(*args)` in a forked child that exits without Python cleanup."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        status = 0
        try:
            body(*args)
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    return pid


def _reap(pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"benchmark child {pid} failed (status {status})")


def _raw_sender(sock: socket.socket, other: socket.socket, chunk: int, total: int) -> None:
    other.close()
    _send_all(sock, chunk, total)
    sock.close()


def raw_once(total: int, chunk: int) -> float:
    """GB/s of one process sending `total` bytes to another over a Unix stream socket."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        started = time.perf_counter()
        pid = _fork(_raw_sender, a, b, chunk, total)
        a.close()
        got = _recv_all(b, chunk)
        seconds = time.perf_counter() - started
    _reap(pid)
    if got != total:
        raise RuntimeError(f"raw baseline received {got} of {total} bytes")
    return gbps(total, seconds)


def _frame_sender(
    sock: socket.socket, frame: int, frames: int, others: tuple[socket.socket, ...]
) -> None:
    for other in others:
        other.close()
    header = HEADER.pack(KIND_ARROW, frame)
    payload = memoryview(bytearray(frame))
    for _ in range(frames):
        views = [memoryview(header), payload]
        while views:
            sent = sock.sendmsg(views)
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if views and sent:
                views[0] = views[0][sent:]
    sock.close()


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            if got:
                raise RuntimeError("connection closed inside a frame")
            return False
        got += n
    return True


def _frame_relay(
    inbound: socket.socket, outbound: socket.socket, frame: int, others: tuple[socket.socket, ...]
) -> None:
    """What the supervisor does per batch, minus Arrow: recv header + payload, sendmsg both."""
    for other in others:
        other.close()
    header = memoryview(bytearray(HEADER.size))
    payload = memoryview(bytearray(frame))
    while _recv_exact(inbound, header):
        _, length = HEADER.unpack(header)
        _recv_exact(inbound, payload[:length])
        outbound.sendmsg([header, payload[:length]])  # blocking: sends everything
    outbound.close()


def relay_once(frame: int, frames: int) -> float:
    """GB/s of frames moved sender -> relay -> receiver, three processes, two Unix sockets."""
    s1, r1 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    s2, r2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with s1, r1, s2, r2:
        started = time.perf_counter()
        sender = _fork(_frame_sender, s1, frame, frames, (r1, s2, r2))
        relay = _fork(_frame_relay, r1, s2, frame, (s1, r2))
        for x in (s1, r1, s2):
            x.close()
        got = _recv_all(r2, 8 * MIB)
        seconds = time.perf_counter() - started
    _reap(sender)
    _reap(relay)
    expected = frames * (frame + HEADER.size)
    if got != expected:
        raise RuntimeError(f"relay baseline received {got} of {expected} bytes")
    return gbps(frames * frame, seconds)


# --- the pipeline: `dativo run` ----------------------------------------------------------------


def job_yaml(
    *, rows: int, columns: int, batch_size: int, memory: str, state: Path, max_frame: int
) -> str:
    resources = f"{{cpus: 1, memory: {memory}}}"
    return f"""\
version: 1
name: bench-transport
source:
  reader:
    type: builtin
    name: generate
    config: {{rows: {rows}, columns: {columns}, seed: 0, repeat_batch: true}}
    resources: {resources}
target:
  writer:
    type: builtin
    name: "null"
    resources: {resources}
state:
  path: {state}
run:
  batch_size: {batch_size}
  max_frame_bytes: {max_frame}
"""


class Pipeline:
    """Writes job files into a scratch directory and runs them with `dativo run`."""

    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        self.workdir = workdir
        self.args = args
        self.frame_bytes = 0  # bytes of one full batch at args.batch_size, once known
        self.count = 0

    def run(self, rows: int, *, batch_size: int | None = None, in_process: bool = False) -> dict:
        self.count += 1
        batch_size = batch_size or self.args.batch_size
        estimate = self.frame_bytes * batch_size // self.args.batch_size
        max_frame = max(128 * MIB, 2 * estimate)  # the default 128MiB, unless a frame is bigger
        job = self.workdir / f"job-{self.count}.yaml"
        report_path = self.workdir / f"report-{self.count}.json"
        job.write_text(
            job_yaml(
                rows=rows,
                columns=self.args.columns,
                batch_size=batch_size,
                memory=self.args.memory,
                state=self.workdir / "state.db",
                max_frame=max_frame,
            )
        )
        cmd = [PYTHON, "-m", "dativo", "run", str(job), "--json", str(report_path), "--quiet"]
        if in_process:
            cmd.append("--in-process")
        child: ChildRun = run_child(cmd, timeout=self.args.timeout).check()
        report = json.loads(report_path.read_text())
        if report.get("status") != "succeeded" or report.get("rows") != rows:
            raise RuntimeError(f"unexpected report: {json.dumps(report)[:2000]}")
        stream = report["stream_seconds"]
        return {
            "rows": rows,
            "batch_size": batch_size,
            "bytes": report["bytes"],
            "batches": report["batches"],
            "stream_seconds": stream,
            "run_seconds": report["seconds"],
            "wall_seconds": child.wall_seconds,
            "gbps": gbps(report["bytes"], stream),
            "rows_per_s": rows / stream if stream else 0.0,
            "rss_mb": child.peak_rss_mb,
            "cpu_seconds": child.user_seconds + child.system_seconds,
        }


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the main job")
    p.add_argument("--big-rows", type=int, default=10_000_000, help="rows of the RSS check")
    p.add_argument("--columns", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=65_536, help="run.batch_size (default)")
    p.add_argument(
        "--sweep",
        default="16384,65536,262144",
        help="comma-separated run.batch_size values to compare ('' to skip)",
    )
    p.add_argument("--sweep-rows", type=int, default=4_000_000, help="rows per sweep run")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement (best is kept)")
    p.add_argument("--raw-gib", type=float, default=4.0, help="GiB sent per raw baseline run")
    p.add_argument("--chunks-mib", default="1,4,8", help="sendall chunk sizes for the raw run")
    p.add_argument("--memory", default="2GiB", help="memory limit of each plugin container")
    p.add_argument("--timeout", type=float, default=600.0, help="per `dativo run` (seconds)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return measure_and_report(args)
    except (RuntimeError, OSError) as exc:
        print(f"bench transport: failed: {exc}", file=sys.stderr)
        return 1


def measure_and_report(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    n = args.repeat
    print("Transport benchmark: reader container -> supervisor -> writer container")
    print(
        f"job: builtin `generate` ({args.rows:,} rows x {args.columns} mixed columns, "
        f"repeat_batch: true - the reader builds ONE batch and re-sends it, so its own "
        f"generation cost does not dominate) -> builtin `null`; cpus 1, memory "
        f"{args.memory} per plugin; run.batch_size {args.batch_size:,}"
    )
    print()

    with tempfile.TemporaryDirectory(prefix="dativo-bench-") as tmp:
        pipe = Pipeline(Path(tmp), args)
        # First, so a missing image fails the benchmark at once. One full batch: its size is
        # the frame size of every batch that follows.
        progress("warm-up run: one batch (container start, page cache, frame size)")
        warm = pipe.run(args.batch_size)
        frame = warm["bytes"] // warm["batches"]
        pipe.frame_bytes = frame

        # 1. raw Unix-socket bandwidth (this process has no threads: forking is safe).
        total = int(args.raw_gib * (1 << 30))
        chunks = [int(float(c) * MIB) for c in args.chunks_mib.split(",") if c.strip()]
        raw_by_chunk: dict[int, list[float]] = {}
        for chunk in chunks:
            progress(
                f"raw: {args.raw_gib:g} GiB over a Unix socket in {chunk / MIB:g} MiB sends x{n}"
            )
            raw_by_chunk[chunk] = [raw_once(total, chunk) for _ in range(n)]
        best_chunk = max(raw_by_chunk, key=lambda c: max(raw_by_chunk[c]))
        raw = max(raw_by_chunk[best_chunk])

        # 2. relay: the pipeline's two socket hops with a pure-Python middle, no Arrow.
        frames = max(1, total // frame)
        progress(f"relay: {frames} frames of {frame / 1e6:.1f} MB through a middle process x{n}")
        relays = [relay_once(frame, frames) for _ in range(n)]
        relay = max(relays)

        # 3. the pipeline, best of n; its peak RSS is the max over the n runs.
        def measure(i: int, rows: int = args.rows, in_process: bool = False) -> dict:
            mode = "in-process" if in_process else "containers"
            progress(f"dativo run ({mode}): {rows:,} rows, run {i + 1}/{n}")
            return pipe.run(rows, in_process=in_process)

        best, runs = best_of(n, measure, key=lambda r: r["gbps"])
        rss_1m = max(r["rss_mb"] for r in runs)

        progress(f"dativo run (containers): {args.big_rows:,} rows, for peak RSS")
        big = pipe.run(args.big_rows)
        # Throughput net of fixed costs (first batch generation, first-frame latency):
        extra_bytes = big["bytes"] - best["bytes"]
        extra_seconds = big["stream_seconds"] - best["stream_seconds"]
        marginal = gbps(extra_bytes, extra_seconds) if extra_seconds > 0 else None

        # 4. in-process baseline (plugins in threads of the supervisor, no containers).
        inproc, inproc_runs = best_of(
            n, lambda i: measure(i, in_process=True), key=lambda r: r["gbps"]
        )

        # 5. batch sizes.
        sweep: list[dict] = []
        sizes = [int(s) for s in args.sweep.split(",") if s.strip()]
        for size in sizes:
            reps = max(1, min(n, 2))

            def one(i: int, size: int = size, reps: int = reps) -> dict:
                progress(
                    f"sweep: batch_size {size:,}, {args.sweep_rows:,} rows, run {i + 1}/{reps}"
                )
                return pipe.run(args.sweep_rows, batch_size=size)

            sweep.append(best_of(reps, one, key=lambda r: r["gbps"])[0])

    elapsed = time.perf_counter() - started
    ratio = best["gbps"] / raw if raw else 0.0

    # --- report --------------------------------------------------------------------------------
    print(
        table(
            ["baseline", "GB/s", "runs (GB/s)"],
            [
                [
                    f"raw Unix socket, {c // MIB} MiB sends" + (" *" if c == best_chunk else ""),
                    max(v),
                    " ".join(f"{x:.2f}" for x in v),
                ]
                for c, v in raw_by_chunk.items()
            ]
            + [
                [
                    f"relay, 3 processes, {frame / 1e6:.1f} MB frames",
                    relay,
                    " ".join(f"{x:.2f}" for x in relays),
                ]
            ],
        )
    )
    print()
    headers = [
        "dativo run",
        "rows",
        "GB/s",
        "rows/s",
        "stream s",
        "run s",
        "wall s",
        "CPU s",
        "RSS MiB",
    ]

    def row(label: str, r: dict) -> list[Any]:
        return [
            label,
            r["rows"],
            r["gbps"],
            int(r["rows_per_s"]),
            r["stream_seconds"],
            r["run_seconds"],
            r["wall_seconds"],
            r["cpu_seconds"],
            r["rss_mb"],
        ]

    rows = [row(f"containers, run {i + 1}", r) for i, r in enumerate(runs)]
    rows.append(row("containers, RSS run", big))
    rows += [row(f"in-process, run {i + 1}", r) for i, r in enumerate(inproc_runs)]
    print(table(headers, rows))
    print()
    if sweep:
        print(
            table(
                ["run.batch_size", "frame MB", "batches", "GB/s", "rows/s", "stream s", "RSS MiB"],
                [
                    [
                        r["batch_size"],
                        r["bytes"] / r["batches"] / 1e6,
                        r["batches"],
                        r["gbps"],
                        int(r["rows_per_s"]),
                        r["stream_seconds"],
                        r["rss_mb"],
                    ]
                    for r in sweep
                ],
            )
        )
        print()
    print(f"raw Unix socket (best):          {raw:6.2f} GB/s  ({best_chunk // MIB} MiB sends)")
    print(f"relay baseline (2 hops, no Arrow): {relay:4.2f} GB/s")
    print(
        f"pipeline (containers, best of {n}):  {best['gbps']:4.2f} GB/s  "
        f"{best['rows_per_s']:,.0f} rows/s streaming, {best['wall_seconds']:.2f} s wall "
        f"({args.rows / best['wall_seconds']:,.0f} rows/s incl. start-up)"
    )
    if marginal is not None:
        print(
            f"pipeline, marginal {args.rows:,} -> {args.big_rows:,} rows: {marginal:4.2f} GB/s "
            "(excludes fixed per-run costs such as generating the first batch)"
        )
    print(f"in-process (no containers):       {inproc['gbps']:6.2f} GB/s")
    print(f"ratio pipeline / raw:             {ratio:6.2f}  (goal >= 0.3, stretch 0.4)")
    print(
        f"supervisor peak RSS:  {rss_1m:.0f} MiB at {args.rows:,} rows, "
        f"{big['rss_mb']:.0f} MiB at {args.big_rows:,} rows  (goal < 200, flat in rows)"
    )
    print(f"batch frame: {frame:,} bytes ({args.batch_size:,} rows); took {elapsed:.0f} s")

    result: dict[str, Any] = {
        "raw_gbps": round(raw, 3),
        "pipeline_gbps": round(best["gbps"], 3),
        "inprocess_gbps": round(inproc["gbps"], 3),
        "ratio": round(ratio, 3),
        "supervisor_rss_mb_1m": round(rss_1m, 1),
        "supervisor_rss_mb_10m": round(big["rss_mb"], 1),
        "rows": args.rows,
        "columns": args.columns,
        "batch_bytes": frame,
        "batch_size": args.batch_size,
        "relay_gbps": round(relay, 3),
        "raw_chunk_bytes": best_chunk,
        "pipeline_gbps_marginal": None if marginal is None else round(marginal, 3),
        "pipeline_gbps_10m": round(big["gbps"], 3),
        "pipeline_rows_per_s": round(best["rows_per_s"]),
        "pipeline_stream_seconds": best["stream_seconds"],
        "pipeline_wall_seconds": round(best["wall_seconds"], 3),
        "supervisor_cpu_seconds_10m": round(big["cpu_seconds"], 2),
        "big_rows": args.big_rows,
        "repeat_batch": True,
        "sweep": [
            {
                "batch_size": r["batch_size"],
                "rows": r["rows"],
                "gbps": round(r["gbps"], 3),
                "rss_mb": round(r["rss_mb"], 1),
            }
            for r in sweep
        ],
        "repeat": n,
        "seconds": round(elapsed, 1),
        "load_avg_start": load_start,
        **machine_info(),
    }
    emit_result("transport", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
