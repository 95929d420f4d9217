"""Signature verification benchmark: what checking a plugin image costs before each run.

`make bench-signing` (or `.venv/bin/python bench/signing.py`) measures, in one run, on the signed
built-in image `dativo/builtin-generate:<version>` (built and signed by `make images`):

1. trust    loading and validating the trust store, the policy and the versions seen;
2. verify   `verify_plugin` as the supervisor calls it before a run (trust included): the image's
            manifest, its signature files, Ed25519, the policy, rollback and grants;
3. inspect  the same plus asking the engine for the image (`docker image inspect` by API),
            which a run does anyway;
4. start    the baseline: `docker run --rm --network none --entrypoint true IMAGE`, the cheapest
            container start and removal there is.

Medians of --repeat runs (start: of --starts runs). The last line of stdout is `RESULT {json}`.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from _common import emit_result, machine_info, progress, table

from dativo import __version__
from dativo.sandbox import Engine
from dativo.signing import Grants, load_trust, verify_plugin


def median_ms(n: int, work: Callable[[], object]) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50, help="verifications (default 50)")
    parser.add_argument("--starts", type=int, default=7, help="container starts (default 7)")
    parser.add_argument("--image", default=f"dativo/builtin-generate:{__version__}")
    args = parser.parse_args()

    engine = Engine()
    info = engine.image(args.image)
    grants = Grants(field_path="source.reader")

    def verify() -> object:
        verified = verify_plugin(info, role="reader", grants=grants)
        assert verified.signed, "the image is not signed; run `make images`"
        return verified

    def inspect_and_verify() -> object:
        return verify_plugin(engine.image(args.image), role="reader", grants=grants)

    def start() -> object:
        proc = subprocess.run(
            ["docker", "run", "--rm", "--network", "none", "--entrypoint", "true", args.image],
            capture_output=True,
            check=False,
        )
        if proc.returncode != 0:
            raise SystemExit(f"docker run failed: {proc.stderr.decode()[-500:]}")
        return proc

    verify()  # warm: imports, page cache
    progress(f"trust store, {args.repeat} loads")
    trust_ms = median_ms(args.repeat, load_trust)
    progress(f"verify_plugin, {args.repeat} runs")
    verify_ms = median_ms(args.repeat, verify)
    progress(f"inspect + verify_plugin, {args.repeat} runs")
    inspect_ms = median_ms(args.repeat, inspect_and_verify)
    progress(f"docker run --rm IMAGE true, {args.starts} runs")
    start()
    start_ms = median_ms(args.starts, start)

    rows = [
        ["trust store + policy load", trust_ms, "-"],
        ["verify_plugin (trust included)", verify_ms, f"{verify_ms / start_ms:.1%}"],
        ["image inspect + verify_plugin", inspect_ms, f"{inspect_ms / start_ms:.1%}"],
        ["docker run --rm IMAGE true", start_ms, "100.0%"],
    ]
    print(f"signature verification of {args.image} ({info.id[:19]}…), medians")
    print(table(["step", "ms", "of a container start"], rows))
    print(f"per run (reader + writer): {2 * inspect_ms:.1f} ms of verification")
    emit_result(
        "signing",
        {
            "image": args.image,
            "trust_ms": round(trust_ms, 3),
            "verify_ms": round(verify_ms, 3),
            "inspect_verify_ms": round(inspect_ms, 3),
            "container_start_ms": round(start_ms, 1),
            "ratio": round(inspect_ms / start_ms, 4),
            **machine_info(),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
