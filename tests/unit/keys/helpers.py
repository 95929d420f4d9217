"""Shared helpers of the encryption tests: source data with known values, encrypted jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from dativo.config import JobConfig, parse_job
from dativo.keys._file import create_key_file

#: Values that must never appear in plain text in anything written.
SECRET_VALUES = [f"alice.{i}@secret-mail.example" for i in range(40)] + [
    f"SSN-{i:03d}-77-{i:04d}" for i in range(40)
]


def source_table() -> pa.Table:
    rows = 40
    return pa.table(
        {
            "id": pa.array(range(rows), type=pa.int64()),
            "email": [f"alice.{i}@secret-mail.example" for i in range(rows)],
            "ssn": [f"SSN-{i:03d}-77-{i:04d}" for i in range(rows)],
            "city": [f"Zanzibar-City-{i % 3}" for i in range(rows)],
        }
    )


def write_source(tmp_path: Path) -> pa.Table:
    """The source table as CSV under `tmp_path/in`."""
    table = source_table()
    (tmp_path / "in").mkdir(exist_ok=True)
    lines = ["id,email,ssn,city"]
    for row in table.to_pylist():
        lines.append(f"{row['id']},{row['email']},{row['ssn']},{row['city']}")
    (tmp_path / "in" / "people.csv").write_text("\n".join(lines) + "\n")
    return table


def key_file(tmp_path: Path, key_ids: tuple[str, ...] = ("data", "pii")) -> Path:
    path = tmp_path / "keys" / "dativo-keys.json"
    path.parent.mkdir(exist_ok=True)
    create_key_file(path, list(key_ids))
    return path


def encrypted_job(
    tmp_path: Path,
    key_service: dict[str, Any],
    *,
    target: str = "out",
    column_keys: dict[str, list[str]] | None = None,
    name: str = "people",
    footer_key: str = "data",
) -> JobConfig:
    return parse_job(
        {
            "version": 1,
            "name": name,
            "source": {
                "files": "in",
                "reader": {
                    "type": "builtin",
                    "name": "files",
                    "config": {
                        "paths": ["*.csv"],
                        "schema": {
                            "id": "int64",
                            "email": "string",
                            "ssn": "string",
                            "city": "string",
                        },
                    },
                },
            },
            "target": {
                "path": target,
                "writer": {"type": "builtin", "name": "parquet", "config": {"compression": "none"}},
                "encryption": {
                    "key_service": key_service,
                    "footer_key": footer_key,
                    "column_keys": {"pii": ["email", "ssn"]}
                    if column_keys is None
                    else column_keys,
                },
            },
        },
        base_dir=tmp_path,
    )


def all_bytes(root: Path) -> list[tuple[Path, bytes]]:
    """Every file under `root`, with its bytes."""
    return [(p, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()]
