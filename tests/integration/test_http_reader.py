"""The built-in `http` reader in its container: a JSON API on the supervisor's loopback, reached
only through the job's network grant (the supervisor's forwarder and the plugin host's relay).

The grant is the literal `127.0.0.1:<port>` of a scripted server (tests/http_api.py) on this
machine; the reader sends `Host: 127.0.0.1:<port>` while its socket goes to the relay.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from tests.http_api import Api, Reply, Request

from dativo.config import parse_job
from dativo.errors import PluginError
from dativo.sandbox import runtime_base
from dativo.state import StateStore
from dativo.supervisor import run_job

pytestmark = pytest.mark.docker

TOKEN = "s3cr3t-http-token-never-shown"
ROWS = [
    {"id": i, "updated_at": f"2024-01-{i:02d}T00:00:00Z", "user": {"name": f"u{i}"}}
    for i in range(1, 8)
]


@pytest.fixture
def api(docker_engine: str) -> Iterator[Api]:
    server = Api()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATIVO_TEST_HTTP_TOKEN", TOKEN)


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    yield
    assert list(runtime_base().iterdir()) == []
    leftover = [t.name for t in threading.enumerate() if t.name.startswith("dativo-net-")]
    assert leftover == [], f"forwarder threads left running: {leftover}"


def job(tmp_path: Path, api: Api, **config: Any) -> Any:
    return parse_job(
        {
            "version": 1,
            "name": "http-api",
            "source": {
                "reader": {
                    "type": "builtin",
                    "name": "http",
                    "network": [api.destination],
                    "config": {
                        "url": api.url(),
                        "headers": {"Authorization": "Bearer ${DATIVO_TEST_HTTP_TOKEN}"},
                        "records": "data",
                        **config,
                    },
                }
            },
            "target": {"path": "out", "writer": {"type": "builtin", "name": "parquet"}},
            "run": {"handshake_timeout": "60s"},
        },
        base_dir=tmp_path,
    )


def published(target: Path) -> list[dict[str, Any]]:
    files = sorted(p for p in target.rglob("*.parquet") if ".dativo-staging" not in p.parts)
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def linked_pages(request: Request) -> Reply:
    if request.headers.get("authorization") != f"Bearer {TOKEN}":
        return Reply(401, {"error": "unauthorised"})
    since = request.query.get("updated_since", "")
    rows = [r for r in ROWS if r["updated_at"] > since]
    page = int(request.query.get("page", "1"))
    headers = {}
    if page * 3 < len(rows):
        headers["Link"] = f'</items?page={page + 1}&updated_since={since}>; rel="next"'
    return Reply(body={"data": rows[(page - 1) * 3 : page * 3]}, headers=headers)


def test_pages_arrive_through_the_grant_and_the_cursor_is_saved(tmp_path: Path, api: Api) -> None:
    api.handler = linked_pages
    spec = job(
        tmp_path,
        api,
        pagination={"type": "link"},
        incremental={"field": "updated_at", "param": "updated_since"},
    )
    report = run_job(spec)
    rows = published(tmp_path / "out")
    assert sorted(r["id"] for r in rows) == list(range(1, 8))
    assert {r["user.name"] for r in rows} == {f"u{i}" for i in range(1, 8)}
    assert all(r.headers["host"] == api.destination for r in api.requests)
    stats = report.to_json()["plugins"]["reader"]["network"][api.destination]
    assert stats["connections"] == 3  # one per page
    saved = StateStore(spec.state_path).describe("http-api")
    assert saved is not None
    assert saved["state"]["cursor"] == "2024-01-07T00:00:00Z"

    # The next run asks only for what changed since the saved cursor.
    api.requests.clear()
    assert run_job(spec).rows == 0
    assert api.requests[0].query["updated_since"] == "2024-01-07T00:00:00Z"


def test_a_next_page_beyond_the_grant_fails_and_never_shows_the_token(
    tmp_path: Path, api: Api
) -> None:
    api.handler = lambda _req: Reply(
        body={"data": ROWS[:2]},
        headers={"Link": '<https://elsewhere.example/items?page=2>; rel="next"'},
    )
    with pytest.raises(PluginError) as caught:
        run_job(job(tmp_path, api, pagination={"type": "link"}))
    message = str(caught.value)
    assert caught.value.role == "reader"
    assert "`elsewhere.example:443`, which the job does not grant" in message
    assert TOKEN not in message
    assert published(tmp_path / "out") == []
