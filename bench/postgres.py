"""PostgreSQL readers: the built-in Python reader and the Rust reader against the COPY floor.

One run, one server (the locally built `dativo/svc-postgres`, `make services`), one table of
`--rows` rows (default 1,000,000) x 50 mixed columns (int2/4/8, float4/8, text, varchar,
numeric(12,2), bool, date, timestamp, timestamptz; about 5% NULLs), measured as:

  (a) floor      psql runs `COPY (SELECT * FROM t) TO STDOUT (FORMAT binary)` into /dev/null:
                 the server's work plus the bytes on the wire, nothing decoded;
  (b) psycopg2   the usual Python way: a server-side cursor, `fetchmany` batches of rows,
                 turned into Arrow record batches column by column (in a child process, for
                 its own peak RSS);
  (c) python     `dativo run` with the built-in `postgres` reader in its container, into the
                 `null` writer and into the `parquet` writer; and once more into `null` with
                 `parallel.workers: 2` (two connections sharing one snapshot);
  (d) rust       the same with `dativo/rust-postgres` (plugin-images/rust-postgres).

Every client reaches the server at its container address on the services network (psql and
psycopg2 directly, the readers through the supervisor's forwarder), so none pays for Docker's
port proxy. Times are wall-clock seconds of the whole command (for (c) and (d): containers
started, verified, handshake, stream, publish); the run report's stream time is shown too.
Peak memory: (b) the child's peak RSS; (c)/(d) the reader container's cgroup high-water mark
(`memory.peak`). Each measurement is the best of `--repeat` runs.

The last line of stdout is `RESULT {json}` with every figure and the ratios `python_vs_floor`,
`rust_vs_floor` (time over the floor's time, null writer) and `python_speedup_vs_psycopg2`.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import PYTHON, ROOT, emit_result, machine_info, progress, run_child, table

sys.path.insert(0, str(ROOT))

from tests.services import PostgresService, postgres_service

PASSWORD_ENV = "DATIVO_BENCH_PG_PASSWORD"
RUST_IMAGE = "dativo/rust-postgres:0.1.0"

# The column mix, cycled after `id`: (SQL type, expression over g = row number, c = column).
_MIX = [
    ("int4", "((g * 7919 + {c}) % 1000003)::int4"),
    ("int8", "(g::int8 * 2654435761 + {c})"),
    ("float8", "((g * 31 + {c}) % 100000) / 7.0"),
    ("text", "md5((g + {c})::text)"),
    ("numeric(12,2)", "((g * 13 + {c}) % 10000000) / 100.0"),
    ("timestamp", "timestamp '2020-01-01' + (g + {c}) * interval '1 second'"),
    ("bool", "(g + {c}) % 3 = 0"),
    ("date", "date '2020-01-01' + ((g + {c}) % 3650)::int4"),
    ("timestamptz", "timestamptz '2020-01-01 00:00+00' + (g * 7 + {c}) * interval '1 ms'"),
    ("float4", "((g + {c}) % 1000)::float4 / 3"),
    ("varchar(32)", "substr(md5(({c} - g)::text), 1, (5 + (g + {c}) % 20)::int4)"),
    ("int2", "((g + {c}) % 30000)::int2"),
]
COLUMNS = 50


def table_sql(rows: int) -> list[str]:
    columns, values = ["id int8"], ["g"]
    for c in range(1, COLUMNS):
        kind, expression = _MIX[(c - 1) % len(_MIX)]
        columns.append(f"c{c} {kind}")
        value = expression.format(c=c)
        values.append(f"CASE WHEN (g * {c} + {c}) % 20 = 0 THEN NULL ELSE ({value})::{kind} END")
    return [
        "DROP TABLE IF EXISTS bench",
        f"CREATE TABLE bench ({', '.join(columns)})",
        f"INSERT INTO bench SELECT {', '.join(values)} FROM generate_series(1::int8, {rows}) g",
        "VACUUM FREEZE ANALYZE bench",
    ]


PSYCOPG2_CHILD = r"""
import sys, time
import psycopg2, pyarrow as pa
dsn, batch = sys.argv[1], int(sys.argv[2])
started = time.perf_counter()
conn = psycopg2.connect(dsn)
cur = conn.cursor(name="bench")          # server-side cursor: rows arrive batch by batch
cur.itersize = batch
cur.execute("SELECT * FROM bench")
rows = nbytes = 0
while True:
    chunk = cur.fetchmany(batch)
    if not chunk:
        break
    names = [d[0] for d in cur.description]
    columns = list(zip(*chunk))
    record = pa.RecordBatch.from_arrays([pa.array(col) for col in columns], names=names)
    rows += record.num_rows
    nbytes += record.nbytes
conn.close()
print(rows, nbytes, time.perf_counter() - started)
"""


def job_yaml(
    reader: str, writer: str, pg: PostgresService, workdir: Path, batch: int, workers: int = 1
) -> str:
    parallel = f", parallel: {{workers: {workers}}}" if workers > 1 else ""
    config = (
        f"{{host: {pg.container_ip}, port: 5432, database: {pg.database}, user: {pg.user}, "
        f"password: '${{{PASSWORD_ENV}}}', table: bench, sslmode: disable{parallel}}}"
    )
    if reader == "python":
        spec = "type: builtin\n    name: postgres"
    else:
        spec = f"type: image\n    image: {RUST_IMAGE}"
    # The null writer stages nothing, so its job has no target path to publish to.
    target = (
        'writer: {type: builtin, name: "null"}'
        if writer == "null"
        else f"path: {workdir / 'out'}\n  writer: {{type: builtin, name: parquet}}"
    )
    return f"""\
version: 1
name: bench-postgres-{reader}-{writer}
source:
  reader:
    {spec}
    network: ["{pg.container_ip}:5432"]
    config: {config}
    resources: {{cpus: 1, memory: 2GiB}}
target:
  {target}
state:
  path: {workdir / "state.db"}
run:
  batch_size: {batch}
"""


class Bench:
    def __init__(self, args: argparse.Namespace, pg: PostgresService, workdir: Path) -> None:
        self.args = args
        self.pg = pg
        self.workdir = workdir
        self.count = 0
        self.env = {**os.environ, PASSWORD_ENV: pg.password}

    def floor(self) -> dict[str, Any]:
        psql = shutil.which("psql")
        if psql is None:
            raise SystemExit("bench: psql is not installed (apt-get install postgresql-client)")
        script = (
            f'"{psql}" "$1" -X -q -c "COPY (SELECT * FROM bench) TO STDOUT (FORMAT binary)" '
            "> /dev/null"
        )
        child = run_child(["sh", "-c", script, "sh", self.pg.container_dsn]).check()
        return {"seconds": child.wall_seconds, "peak_mb": child.peak_rss_mb}

    def psycopg2(self) -> dict[str, Any]:
        child = run_child(
            [PYTHON, "-c", PSYCOPG2_CHILD, self.pg.container_dsn, str(self.args.batch_size)]
        ).check()
        rows, nbytes, _ = child.stdout.split()
        if int(rows) != self.args.rows:
            raise RuntimeError(f"psycopg2 read {rows} rows, expected {self.args.rows}")
        return {"seconds": child.wall_seconds, "peak_mb": child.peak_rss_mb, "bytes": int(nbytes)}

    def dativo(self, reader: str, writer: str, workers: int = 1) -> dict[str, Any]:
        self.count += 1
        run_dir = self.workdir / f"run-{self.count}"
        run_dir.mkdir()
        job = run_dir / "job.yaml"
        job.write_text(job_yaml(reader, writer, self.pg, run_dir, self.args.batch_size, workers))
        report_path = run_dir / "report.json"
        cmd = [PYTHON, "-m", "dativo", "run", str(job), "--json", str(report_path), "--quiet"]
        child = run_child(cmd, env=self.env, timeout=self.args.timeout).check()
        report = json.loads(report_path.read_text())
        if report.get("status") != "succeeded" or report.get("rows") != self.args.rows:
            raise RuntimeError(f"unexpected report: {json.dumps(report)[:2000]}")
        peak = (report.get("plugins", {}).get("reader") or {}).get("peak_memory_bytes")
        shutil.rmtree(run_dir / "out", ignore_errors=True)
        return {
            "seconds": child.wall_seconds,
            "stream_seconds": report["stream_seconds"],
            "run_seconds": report["seconds"],
            "bytes": report["bytes"],
            "reader_peak_mb": None if peak is None else peak / (1 << 20),
            "supervisor_peak_mb": child.peak_rss_mb,
        }


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return min(runs, key=lambda r: r["seconds"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="rows in the table")
    p.add_argument("--batch-size", type=int, default=65_536, help="rows per batch")
    p.add_argument("--repeat", type=int, default=2, help="runs per measurement (best is kept)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per dativo run")
    p.add_argument("--workers", type=int, default=2, help="parallel.workers of the extra run")
    p.add_argument("--skip-psycopg2", action="store_true", help="skip the slow baseline (b)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rust = bool(run_child(["docker", "image", "inspect", RUST_IMAGE]).returncode == 0)
    if not rust:
        progress(f"{RUST_IMAGE} is not built (`make images`): the Rust reader is not measured")
    with (
        postgres_service(password="bench-Pg-Secret") as pg,
        tempfile.TemporaryDirectory(prefix="dativo-bench-pg-") as tmp,
    ):
        import psycopg

        progress(f"creating {args.rows:,} rows x {COLUMNS} columns")
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            for statement in table_sql(args.rows):
                conn.execute(statement)
            size = conn.execute("SELECT pg_total_relation_size('bench')").fetchone()
        bench = Bench(args, pg, Path(tmp))
        progress("(a) COPY binary to /dev/null with psql (the floor); first run warms the cache")
        bench.floor()
        floor = best([bench.floor() for _ in range(max(args.repeat, 3))])
        results: dict[str, Any] = {"floor": floor}
        if not args.skip_psycopg2:
            progress("(b) psycopg2 fetchmany into Arrow")
            results["psycopg2"] = bench.psycopg2()
        progress(f"(c) python reader, parallel.workers: {args.workers} -> null")
        results["python_parallel_null"] = best(
            [bench.dativo("python", "null", args.workers) for _ in range(args.repeat)]
        )
        readers = ["python", "rust"] if rust else ["python"]
        for reader in readers:
            for writer in ("null", "parquet"):
                progress(f"({'c' if reader == 'python' else 'd'}) {reader} reader -> {writer}")
                repeat = args.repeat if writer == "null" else 1
                results[f"{reader}_{writer}"] = best(
                    [bench.dativo(reader, writer) for _ in range(repeat)]
                )

    def ratio(key: str) -> float | None:
        return round(results[key]["seconds"] / floor["seconds"], 3) if key in results else None

    rows_out: list[list[Any]] = [
        ["(a) psql COPY binary -> /dev/null", floor["seconds"], None, floor["peak_mb"], 1.0],
    ]
    if "psycopg2" in results:
        b = results["psycopg2"]
        rows_out.append(["(b) psycopg2 fetchmany -> Arrow", b["seconds"], None, b["peak_mb"],
                         ratio("psycopg2")])  # fmt: skip
    names = {
        "python": "(c) python reader",
        "python_parallel": f"(c) python reader ({args.workers} workers)",
        "rust": "(d) rust reader",
    }
    for reader, name in names.items():
        for writer in ("null", "parquet"):
            key = f"{reader}_{writer}"
            if key in results:
                r = results[key]
                rows_out.append(
                    [f"{name} -> {writer}", r["seconds"], r["stream_seconds"],
                     r["reader_peak_mb"], ratio(key)]
                )  # fmt: skip
    print(f"PostgreSQL readers, {args.rows:,} rows x {COLUMNS} columns, table "
          f"{size[0] / 1e6:.0f} MB on disk")  # fmt: skip
    print(table(["measurement", "seconds", "stream s", "peak MB", "x floor"], rows_out))
    speedup = (
        round(results["psycopg2"]["seconds"] / results["python_null"]["seconds"], 2)
        if "psycopg2" in results
        else None
    )
    emit_result(
        "postgres",
        {
            "rows": args.rows,
            "columns": COLUMNS,
            "table_bytes": size[0],
            "results": results,
            "python_vs_floor": ratio("python_null"),
            "python_parquet_vs_floor": ratio("python_parquet"),
            "python_parallel_vs_floor": ratio("python_parallel_null"),
            "rust_vs_floor": ratio("rust_null"),
            "rust_parquet_vs_floor": ratio("rust_parquet"),
            "python_speedup_vs_psycopg2": speedup,
            "machine": machine_info(),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
