"""The `dativo validate` and `dativo schema` commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dativo.config import job_json_schema, load_job
from dativo.errors import ConfigError

__all__ = ["register", "schema_text"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `validate` and `schema` to the sub-parsers object of the `dativo` parser."""
    validate = commands.add_parser(
        "validate",
        help="check job files without running them",
        description=(
            "Check one or more job files: YAML syntax, every field, plugin references and "
            "limits. Nothing is run and no container is started."
        ),
    )
    validate.add_argument("jobs", nargs="+", metavar="JOB.yaml", help="job file(s) to check")
    validate.set_defaults(func=run_validate)

    schema = commands.add_parser(
        "schema",
        help="print the JSON Schema of job files",
        description="Print the JSON Schema (draft 2020-12) of job files, for editors and CI.",
    )
    schema.add_argument(
        "-o", "--output", metavar="FILE", help="write the schema to FILE instead of stdout"
    )
    schema.set_defaults(func=run_schema)


def schema_text() -> str:
    """The JSON Schema of job files, exactly as `dativo schema` prints it."""
    return json.dumps(job_json_schema(), indent=2, ensure_ascii=False) + "\n"


def run_validate(args: argparse.Namespace) -> int:
    """Check every job file given; print `ok: ...` for each good one.

    Raises:
        ConfigError: one or more files are wrong; the message holds every file's problems.
    """
    failures: list[str] = []
    for job_file in args.jobs:
        try:
            job = load_job(job_file)
        except ConfigError as exc:
            failures.append(str(exc))
            continue
        reader, writer = job.source.reader, job.target.writer
        print(f"ok: {job_file} (reader {reader.display_name} -> writer {writer.display_name})")
    if failures:
        raise ConfigError("\n".join(failures))
    return 0


def run_schema(args: argparse.Namespace) -> int:
    """Print the job JSON Schema, or write it to `--output`."""
    text = schema_text()
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        Path(args.output).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot write the schema to {args.output}: {exc.strerror or exc}"
        ) from None
    print(f"wrote {args.output}", file=sys.stderr)
    return 0
