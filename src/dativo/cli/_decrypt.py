"""`dativo decrypt` (read encrypted output back with the job's keys) and `dativo audit verify`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dativo.config import load_job
from dativo.errors import ConfigError


def register(commands: Any) -> None:
    decrypt = commands.add_parser(
        "decrypt",
        help="read encrypted Parquet written by a job, with the job's key service",
        description=(
            "Decrypt the Parquet files a job with `target.encryption` wrote, using the job's key "
            "service on this host (its credentials, key file or HSM PIN). A file that was "
            "modified, or a wrong, missing or revoked key, is an error."
        ),
    )
    decrypt.add_argument("path", type=Path, help="an encrypted .parquet file, or a directory")
    decrypt.add_argument("--job", type=Path, required=True, help="the job file that wrote it")
    out = decrypt.add_mutually_exclusive_group()
    out.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="OUT.parquet",
        help="write the decrypted rows as PLAIN Parquet to this new file",
    )
    out.add_argument("--head", type=int, metavar="N", help="print the first N rows as JSON lines")
    decrypt.set_defaults(func=_decrypt)

    audit = commands.add_parser("audit", help="the audit log of encrypted output")
    actions = audit.add_subparsers(dest="action", required=True, metavar="ACTION")
    verify = actions.add_parser(
        "verify",
        help="check the hash chain of `_dativo_audit.jsonl` and every file's SHA-256",
    )
    verify.add_argument("path", help="the target directory (or `s3://bucket/prefix`)")
    verify.add_argument(
        "--no-files", action="store_true", help="check the chain only, not the files' digests"
    )
    verify.add_argument(
        "--expect-head",
        metavar="SHA256",
        help="the `audit_head` of the latest run report: detects records removed at the end",
    )
    verify.set_defaults(func=_verify)


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError(f"`{path}` is neither a file nor a directory")
    found = sorted(
        p
        for p in path.rglob("*.parquet")
        if p.is_file()
        and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
    )
    if not found:
        raise ConfigError(f"no `.parquet` file under `{path}`")
    return found


def _decrypt(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dativo.keys import key_service_for
    from dativo.keys._parquet import read_encrypted

    job = load_job(args.job)
    if args.output is not None and args.output.exists():
        raise ConfigError(f"`{args.output}` exists already; choose a new file")
    service = key_service_for(job)
    try:
        tables = [read_encrypted(str(p), service) for p in _files(args.path)]
    finally:
        service.close()
    table = pa.concat_tables(tables, promote_options="permissive")
    if args.output is not None:
        pq.write_table(table, args.output)
        print(
            f"ok: {table.num_rows:,} rows from {len(tables)} file(s) written UNENCRYPTED to "
            f"{args.output}",
            file=sys.stderr,
        )
    elif args.head is not None:
        for row in table.slice(0, max(args.head, 0)).to_pylist():
            print(json.dumps(row, default=str))
    else:
        print(f"ok: {len(tables)} file(s), {table.num_rows:,} rows, decrypted and authenticated")
        print(table.schema.to_string(show_schema_metadata=False))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from dativo.supervisor._audit import AuditLog

    result = AuditLog(args.path).verify(check_files=not args.no_files, expect_head=args.expect_head)
    for problem in result.problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    if not result.ok:
        print(f"error: the audit log at {args.path} failed verification", file=sys.stderr)
        return 1
    print(
        f"ok: {result.records} record(s), chain intact, {result.files_checked} file digest(s) "
        f"match; head {result.head}"
    )
    return 0
