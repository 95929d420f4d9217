"""Integration-test fixtures: a private run-directory base (engine fixture: tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def private_runtime_dir() -> Iterator[Path]:
    """Give this test session its own run-directory base.

    Containers carry their run directory as a label, so tests can tell their own containers
    from those of other supervisors sharing the engine (a developer's benchmark, say).
    """
    base = Path(tempfile.mkdtemp(prefix="dativo-t-", dir="/tmp"))
    previous = os.environ.get("DATIVO_RUNTIME_DIR")
    os.environ["DATIVO_RUNTIME_DIR"] = str(base)
    yield base
    if previous is None:
        del os.environ["DATIVO_RUNTIME_DIR"]
    else:
        os.environ["DATIVO_RUNTIME_DIR"] = previous
    shutil.rmtree(base, ignore_errors=True)
