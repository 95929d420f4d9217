"""Create the quickstart's input: examples/data/orders/orders.csv, 1M generated rows.

Safe to run twice: an existing file with the right row count is kept.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dativo.connectors.generate import generate_csv

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=HERE / "data" / "orders" / "orders.csv")
    args = parser.parse_args()
    stamp = args.out.with_suffix(".rows")
    if args.out.exists() and stamp.exists() and stamp.read_text().strip() == str(args.rows):
        print(f"reusing {args.out} ({args.rows:,} rows)")
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tmp = args.out.with_suffix(".csv.tmp")
    generate_csv(tmp, rows=args.rows, columns=12, seed=42)
    tmp.replace(args.out)
    stamp.write_text(f"{args.rows}\n")
    size = args.out.stat().st_size / 1e6
    seconds = time.monotonic() - started
    print(f"wrote {args.out} ({args.rows:,} rows, {size:,.0f} MB) in {seconds:.1f} s")


if __name__ == "__main__":
    main()
