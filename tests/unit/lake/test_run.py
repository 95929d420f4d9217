"""Whole runs into Iceberg in the trusted in-process mode (no Docker): supervisor, journal,
state and report together; and what the job file accepts."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from dativo.config import parse_job
from dativo.errors import ConfigError
from dativo.lake import LakeError, committer_for
from dativo.lake._env import aws_settings, expand_env
from dativo.state import StateStore
from dativo.supervisor import RunOptions, run_job
from tests.unit.lake.helpers import read_data_files, sort, summaries, table

SECRET = "s3cr3t-value-never-shown"


def incremental_job(tmp_path: Path, **iceberg: Any) -> Any:
    return parse_job(
        {
            "version": 1,
            "name": "orders",
            "source": {
                "files": "in",
                "reader": {
                    "type": "builtin",
                    "name": "files",
                    "config": {
                        "paths": ["*.csv"],
                        "incremental": True,
                        "schema": {"id": "int64", "name": "string"},
                    },
                },
            },
            "target": {
                "format": "iceberg",
                "iceberg": {"table": "orders", **iceberg},
                "writer": {"type": "builtin", "name": "parquet"},
            },
        },
        base_dir=tmp_path,
    )


def add_csv(tmp_path: Path, n: int, ids: range) -> None:
    (tmp_path / "in").mkdir(exist_ok=True)
    lines = ["id,name", *(f"{i},name-{i}" for i in ids)]
    (tmp_path / "in" / f"batch-{n:03d}.csv").write_text("\n".join(lines) + "\n")


def test_incremental_runs_append_each_row_once(tmp_path: Path) -> None:
    job = incremental_job(tmp_path)
    add_csv(tmp_path, 1, range(0, 100))
    first = run_job(job, RunOptions(in_process=True))
    add_csv(tmp_path, 2, range(100, 150))
    second = run_job(job, RunOptions(in_process=True))
    third = run_job(job, RunOptions(in_process=True))  # nothing new: nothing committed
    assert (first.rows, second.rows, third.rows) == (100, 50, 0)
    report = second.to_json()
    assert report["commit"]["committed"] is True
    assert report["commit"]["table"] == "default.orders"
    assert isinstance(report["commit_seconds"], float)
    assert third.to_json()["commit"] is None or third.to_json()["commit"]["committed"] is False
    tbl = table(job)
    rows = sort(tbl.scan().to_arrow())
    assert rows.column("id").to_pylist() == list(range(150))
    assert sort(read_data_files(tbl)).equals(rows)
    assert [s["dativo.run-id"] for s in summaries(tbl)] == [first.run_id, second.run_id]
    # The state the store holds is the cursor the last commit recorded.
    saved = StateStore(job.state_path).describe("orders")
    assert saved is not None
    assert saved["state"] == json.loads(summaries(tbl)[-1]["dativo.cursor"])
    assert sorted(saved["state"]["files"]) == ["batch-001.csv", "batch-002.csv"]


def test_secrets_are_never_logged_nor_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CATALOG_TOKEN", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET + "-aws")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA" + SECRET)
    caplog.set_level(logging.DEBUG)
    job = incremental_job(
        tmp_path,
        catalog={
            "uri": f"sqlite:///{tmp_path}/${{CATALOG_DIR}}/catalog.db",
            "properties": {"token": "${CATALOG_TOKEN}"},
        },
    )
    monkeypatch.setenv("CATALOG_DIR", "cat")
    add_csv(tmp_path, 1, range(10))
    report = run_job(job, RunOptions(in_process=True))
    text = json.dumps(report.to_json()) + caplog.text
    history = StateStore(job.state_path).runs("orders")
    assert history
    assert SECRET not in text
    assert SECRET not in (tmp_path / ".dativo" / "state.db").read_bytes().decode("latin-1")
    assert (tmp_path / "cat" / "catalog.db").is_file()


def test_a_missing_variable_is_named_and_a_failing_catalog_hides_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = incremental_job(
        tmp_path, catalog={"uri": "postgresql+psycopg://lake:${PG_PASSWORD}@127.0.0.1:1/lake"}
    )
    committer = committer_for(job)
    assert committer is not None
    monkeypatch.delenv("PG_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match="environment variable `PG_PASSWORD`, which is not set"):
        committer.find("run-1")
    monkeypatch.setenv("PG_PASSWORD", SECRET)
    committer = committer_for(job)
    assert committer is not None
    with pytest.raises(LakeError) as caught:
        committer.find("run-1")
    assert "cannot open the sql catalog" in str(caught.value)
    assert SECRET not in str(caught.value)
    assert caught.value.transient


def test_expand_env_and_aws_settings() -> None:
    env = {"A": "1", "B": "two"}
    assert expand_env("x${A}y${B}", field="f", environ=env) == "x1ytwo"
    with pytest.raises(ConfigError, match="`C`"):
        expand_env("${C}", field="f", environ=env)
    assert aws_settings({}) == {"region": "us-east-1"}
    assert aws_settings({"AWS_DEFAULT_REGION": "eu-west-1", "AWS_ENDPOINT_URL": "http://h:1"}) == {
        "region": "eu-west-1",
        "endpoint": "http://h:1",
    }
    assert (
        aws_settings({"AWS_ENDPOINT_URL": "http://a", "AWS_ENDPOINT_URL_S3": "http://b"})[
            "endpoint"
        ]
        == "http://b"
    )


# -- the job file -------------------------------------------------------------------------


def target(**fields: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "name": "orders-daily",
        "source": {"reader": {"type": "builtin", "name": "generate"}},
        "target": {"writer": {"type": "builtin", "name": "parquet"}, **fields},
    }


def problems(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_job(data)
    return str(caught.value)


def test_iceberg_defaults(tmp_path: Path) -> None:
    job = parse_job(target(format="iceberg", iceberg={}), base_dir=tmp_path)
    assert job.iceberg_table == ("default", "orders_daily")
    assert job.iceberg_catalog_uri == f"sqlite:///{tmp_path}/.dativo/catalog.db"
    assert job.iceberg_warehouse == str(tmp_path / "warehouse")
    assert job.staging_base == tmp_path / ".dativo" / "staging" / "orders-daily"
    assert job.target_dir is None
    spec = job.target.iceberg
    assert spec is not None
    assert (spec.mode, spec.key, spec.partition_by, spec.catalog.type) == (
        "append",
        (),
        (),
        "sql",
    )


def test_parquet_on_s3(tmp_path: Path) -> None:
    job = parse_job(target(path="s3://lake/orders/"), base_dir=tmp_path)
    assert job.target_url == "s3://lake/orders"
    assert job.target_dir is None
    assert job.staging_base == tmp_path / ".dativo" / "staging" / "orders-daily"
    local = parse_job(target(path="out"), base_dir=tmp_path)
    assert local.target_dir == tmp_path / "out"
    assert local.staging_base == tmp_path / "out"
    assert "`target.path`: got `s3://Lake/x`; expected `s3://bucket/prefix`" in problems(
        target(path="s3://Lake/x")
    )


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"format": "iceberg"}, "`target`: `format: iceberg` needs an `iceberg` block"),
        ({"iceberg": {}}, "`target`: an `iceberg` block needs `format: iceberg`"),
        (
            {"format": "iceberg", "path": "x", "iceberg": {}},
            "`target`: `path` is for `format: parquet`",
        ),
        (
            {"format": "iceberg", "iceberg": {"mode": "upsert"}},
            "`target.iceberg`: `mode: upsert` needs `key`",
        ),
        (
            {"format": "iceberg", "iceberg": {"key": ["id"]}},
            "`key` is used by `mode: upsert` only",
        ),
        (
            {"format": "iceberg", "iceberg": {"mode": "merge"}},
            "`target.iceberg.mode`: got `merge`; expected one of `append`, `overwrite`, `upsert`",
        ),
        (
            {
                "format": "iceberg",
                "iceberg": {"partition_by": [{"column": "d", "transform": "week"}]},
            },
            "`target.iceberg.partition_by[0].transform`: got `week`; expected an Iceberg transform",
        ),
        (
            {"format": "iceberg", "iceberg": {"table": "1orders"}},
            "`target.iceberg.table`: got `1orders`; expected 1 to 128 letters",
        ),
        (
            {"format": "iceberg", "iceberg": {"catalog": {"type": "rest"}}},
            "a `rest` catalog needs `catalog.uri`",
        ),
        (
            {"format": "iceberg", "iceberg": {"catalog": {"type": "glue"}}},
            "`target.iceberg.catalog.type`: got `glue`; expected one of `sql`, `rest`",
        ),
        (
            {"format": "iceberg", "iceberg": {"colour": 1}},
            "`target.iceberg.colour`: unknown key",
        ),
    ],
)
def test_iceberg_config_errors(fields: dict[str, Any], expected: str) -> None:
    assert expected in problems(target(**fields))


def test_writer_must_not_partition_for_iceberg() -> None:
    data = target(format="iceberg", iceberg={})
    data["target"]["writer"]["config"] = {"partition_by": ["day"]}
    assert "the writer must not partition" in problems(data)


def test_plain_text_secrets_are_refused_without_being_echoed() -> None:
    message = problems(
        target(
            format="iceberg",
            iceberg={"catalog": {"uri": f"postgresql+psycopg://lake:{SECRET}@db/lake"}},
        )
    )
    assert "`target.iceberg.catalog.uri`: the URL holds a password in plain text" in message
    assert SECRET not in message
    message = problems(
        target(format="iceberg", iceberg={"catalog": {"properties": {"token": SECRET}}})
    )
    assert "`token` looks like a secret: write `${ENV_VAR}`" in message
    assert SECRET not in message
    ok = parse_job(
        target(
            format="iceberg",
            iceberg={
                "catalog": {
                    "uri": "postgresql+psycopg://lake:${PGPASSWORD}@db/lake",
                    "properties": {"token": "${TOKEN}", "warehouse": "w"},
                }
            },
        )
    )
    assert ok.iceberg_catalog_uri == "postgresql+psycopg://lake:${PGPASSWORD}@db/lake"
    assert "a `$` must start" in problems(
        target(format="iceberg", iceberg={"catalog": {"uri": "sqlite:///$HOME/c.db"}})
    )
