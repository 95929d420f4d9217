"""Every example job file validates, built-in plugin configs included."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from dativo.config import BuiltinPlugin, load_job
from dativo.connectors import parse_plugin_config
from dativo.signing._builtin import _CONFIG_MODELS

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_there_are_examples() -> None:
    assert {p.name for p in EXAMPLES} >= {
        "quickstart.yaml",
        "postgres.yaml",
        "http.yaml",
        "encrypted.yaml",
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path: Path) -> None:
    job = load_job(path)
    for spec in (job.source.reader, job.target.writer):
        if isinstance(spec, BuiltinPlugin):
            module, _, name = _CONFIG_MODELS[spec.name].partition(":")
            model = getattr(importlib.import_module(module), name)
            parse_plugin_config(model, dict(spec.config), spec.display_name)
