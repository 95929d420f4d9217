"""Encryption benchmark: the built-in `parquet` writer with and without encryption.

`make bench-encryption` (or `.venv/bin/python bench/encryption.py`) writes the same Arrow
batches (`generate_table`: --rows rows x --columns mixed columns, in batches of 65,536 rows, as
the relay hands them over) with the `parquet` writer class directly, in this process, twice
over:

1. plain      the writer as every unencrypted job runs it (zstd; the baseline);
2. encrypted  the same writer with the `encryption` section the supervisor hands it: Parquet
              modular encryption (AES_GCM_V1, encrypted footer, every column encrypted, two
              master keys), its data keys wrapped through a real key broker on a Unix socket,
              backed by the `file` key service.

Timed: `initialize` to `finalize` (every batch written, every file closed and renamed). Not
timed: generating the data, and the supervisor's checks before publishing. Runs alternate
(plain, encrypted, plain, ...) so a noisy moment hits both; best of --repeat each. `ratio` is
encrypted seconds / plain seconds, best against best (goal: at most 1.3).

The last line of stdout is `RESULT {json}`; progress goes to stderr. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
from _common import emit_result, machine_info, progress, table

from dativo.connectors.generate import generate_table
from dativo.connectors.parquet import ParquetWriter
from dativo.keys._file import FileKeys, create_key_file
from dativo.sdk import PluginContext
from dativo.supervisor._keybroker import KeyBroker

BATCH_ROWS = 65_536


def write_once(
    batches: list[pa.RecordBatch], out: Path, encryption: dict[str, Any] | None, label: str
) -> dict[str, Any]:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    config: dict[str, Any] = {"compression": "zstd"}
    if encryption is not None:
        config["encryption"] = encryption
    writer = ParquetWriter()
    started = time.perf_counter()
    writer.initialize(config, PluginContext(run_id=f"bench-{label}", role="writer", output_dir=out))
    for batch in batches:
        writer.write_batch(batch)
    result = writer.finalize()
    seconds = time.perf_counter() - started
    writer.close()
    size = sum(f.bytes for f in result.files)
    progress(f"{label}: {seconds:.3f} s, {len(result.files)} file(s), {size / 1e6:.1f} MB")
    return {"seconds": seconds, "files": len(result.files), "bytes": size}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--columns", type=int, default=12)
    p.add_argument("--repeat", type=int, default=3)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    print("Encryption benchmark: the `parquet` writer, plain and encrypted, on the same batches")
    print(
        f"data: generate_table ({args.rows:,} rows x {args.columns} mixed columns), batches of "
        f"{BATCH_ROWS:,} rows; zstd; writer class driven directly in this process (no "
        "containers); encrypted: AES_GCM_V1, encrypted footer, every column encrypted, keys "
        "wrapped via the key broker + `file` key service"
    )
    print()
    progress(f"generating {args.rows:,} rows")
    data = generate_table(args.rows, args.columns, seed=11)
    batches = data.to_batches(max_chunksize=BATCH_ROWS)
    arrow_bytes = data.nbytes
    del data
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "encrypted": []}
    with tempfile.TemporaryDirectory(prefix="dativo-bench-enc-") as tmp:
        root = Path(tmp)
        key_path = root / "keys.json"
        create_key_file(key_path, ["data", "pii"])
        sockets = root / "sock"
        sockets.mkdir()
        broker = KeyBroker(FileKeys(key_path), ["data", "pii"], sockets)
        broker.start()
        names = batches[0].schema.names
        encryption = {
            "socket": str(broker.path),
            "footer_key": "data",
            "column_keys": {"pii": [n for n in names if n.startswith("string")][:2]},
        }
        try:
            write_once(batches, root / "out", None, "warm-up plain")
            write_once(batches, root / "out", encryption, "warm-up encrypted")
            for i in range(args.repeat):
                for kind in ("plain", "encrypted"):
                    runs[kind].append(
                        write_once(
                            batches,
                            root / "out",
                            encryption if kind == "encrypted" else None,
                            f"{kind} {i + 1}/{args.repeat}",
                        )
                    )
        finally:
            broker.close()
        wraps = sum(w["data_keys"] for w in broker.report()["wrapped"])
    best = {kind: min(r, key=lambda x: x["seconds"]) for kind, r in runs.items()}
    median = {kind: statistics.median(x["seconds"] for x in r) for kind, r in runs.items()}
    ratio = best["encrypted"]["seconds"] / best["plain"]["seconds"]
    rows = [
        [
            kind,
            best[kind]["seconds"],
            median[kind],
            " ".join(f"{x['seconds']:.3f}" for x in runs[kind]),
            args.rows / best[kind]["seconds"],
            best[kind]["files"],
            best[kind]["bytes"] / 1e6,
        ]
        for kind in ("plain", "encrypted")
    ]
    print(
        table(
            ["writer", "best s", "median s", "runs s", "rows/s (best)", "files", "MB written"],
            rows,
        )
    )
    print()
    goal = "met" if ratio <= 1.3 else "NOT met"
    print(
        f"ratio encrypted / plain writer time = {ratio:.3f} (goal <= 1.3: {goal}); "
        f"{wraps} data keys wrapped through the broker over all encrypted runs"
    )
    emit_result(
        "encryption",
        {
            "ratio": round(ratio, 3),
            "encrypted_seconds": round(best["encrypted"]["seconds"], 4),
            "plain_seconds": round(best["plain"]["seconds"], 4),
            "encrypted_median_seconds": round(median["encrypted"], 4),
            "plain_median_seconds": round(median["plain"], 4),
            "encrypted_bytes": best["encrypted"]["bytes"],
            "plain_bytes": best["plain"]["bytes"],
            "files": best["encrypted"]["files"],
            "data_keys_wrapped": wraps,
            "rows": args.rows,
            "columns": args.columns,
            "arrow_bytes": arrow_bytes,
            "repeat": args.repeat,
            "mode": "writer class in process",
            "elapsed_seconds": round(time.perf_counter() - started, 1),
            **machine_info(),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
