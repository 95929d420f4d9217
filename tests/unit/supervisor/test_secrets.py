"""Secrets in a plugin's `config`: `${VAR}` references, expanded by the supervisor only."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dativo.config import JobConfig, parse_job
from dativo.errors import ConfigError
from dativo.lake._env import Redactor
from dativo.supervisor._plugins import expand_config, resolve


def job_text(config: str) -> str:
    return f"""
version: 1
name: secrets
source:
  reader:
    type: builtin
    name: generate
    config: {config}
target:
  path: out
  writer: {{type: builtin, name: parquet}}
"""


def parse(config: str, base: Path) -> JobConfig:
    return parse_job(yaml.safe_load(job_text(config)), source="job.yaml", base_dir=base)


def test_references_expand_everywhere_and_are_remembered() -> None:
    redactor = Redactor()
    env = {"PW": "hunter2", "TOKEN": "t0k3n", "X": "ab"}
    config = {
        "password": "${PW}",
        "nested": {"headers": ["Bearer ${TOKEN}", 3]},
        "short": "${X}",
        "sql": "SELECT $1, $$text$$",
    }
    out = expand_config(config, "source.reader.config", redactor, env)
    assert out == {
        "password": "hunter2",
        "nested": {"headers": ["Bearer t0k3n", 3]},
        "short": "ab",
        "sql": "SELECT $1, $$text$$",
    }
    # Both values are masked; "ab" is too short to mask safely.
    assert redactor("hunter2 t0k3n ab") == "*** *** ab"
    assert config["password"] == "${PW}"  # the job's own config is untouched


def test_unset_variable_names_variable_and_key_not_a_value() -> None:
    with pytest.raises(ConfigError) as caught:
        expand_config({"db": {"password": "${NOPE}"}}, "source.reader.config", Redactor(), {})
    message = str(caught.value)
    assert "`NOPE`" in message
    assert "`source.reader.config.db.password`" in message


@pytest.mark.parametrize(
    "config",
    [
        "{password: hunter2}",
        "{auth: {api_key: abc123}}",
        "{headers: [{Authorization-Token: xyz}]}",
        "{client_secret: 'pre${X}'}",
        "{headers: {Authorization: Bearer xyz}}",
    ],
)
def test_plain_text_secret_in_job_is_refused(config: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(config, Path("."))
    message = str(caught.value)
    assert "looks like a secret" in message
    assert "${ENV_VAR}" in message
    for value in ("hunter2", "abc123", "xyz"):
        assert value not in message


def test_authorization_header_may_spell_out_its_scheme(tmp_path: Path) -> None:
    job = parse("{rows: 1, headers: {Authorization: 'Bearer ${TOKEN}'}}", tmp_path)
    assert job.source.reader.config["headers"]["Authorization"] == "Bearer ${TOKEN}"


def test_launch_carries_expanded_config_and_masks_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATIVO_T_PW", "s3cr3t-value")
    job = parse("{rows: 1, password: '${DATIVO_T_PW}'}", tmp_path)
    launch = resolve(job, "reader", None)
    assert launch.config["password"] == "s3cr3t-value"
    assert job.source.reader.config["password"] == "${DATIVO_T_PW}"
    assert launch.redact("login failed for s3cr3t-value@db") == "login failed for ***@db"
