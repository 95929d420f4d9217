"""The `dativo` command line: parses arguments, runs a command, turns errors into diagnoses."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence

from dativo import __version__
from dativo.errors import DativoError

__all__ = ["main"]


def _build_parser() -> argparse.ArgumentParser:
    # Each command module registers its own sub-parser and sets `func`.
    from dativo.cli import _decrypt, _keys, _plugin, _run, _state, _trust, _validate

    parser = argparse.ArgumentParser(
        prog="dativo",
        description="Move data with sandboxed reader and writer plugins.",
    )
    parser.add_argument("--version", action="version", version=f"dativo {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show debug logs and tracebacks"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (_validate, _run, _state, _plugin, _keys, _trust, _decrypt):
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("urllib3", "docker"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        status: int = args.func(args)
    except DativoError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return status
