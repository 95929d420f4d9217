"""`dativo state show|reset JOB`: inspect or forget a job's incremental state."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dativo.config import load_job
from dativo.state import StateStore


def register(commands: Any) -> None:
    parser = commands.add_parser("state", help="show or reset a job's incremental state")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="print the saved state and recent runs as JSON")
    show.add_argument("job", type=Path)
    show.set_defaults(func=_show)
    reset = actions.add_parser("reset", help="forget the state: the next run reads everything")
    reset.add_argument("job", type=Path)
    reset.set_defaults(func=_reset)


def _show(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    store = StateStore(job.state_path)
    saved = store.describe(job.name)
    print(
        json.dumps(
            {
                "job": job.name,
                "database": str(job.state_path),
                "saved": saved,
                "runs": store.runs(job.name, limit=10),
            },
            indent=2,
        )
    )
    return 0


def _reset(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    existed = StateStore(job.state_path).reset(job.name)
    print(f"{'reset' if existed else 'no state to reset for'} `{job.name}`")
    return 0
