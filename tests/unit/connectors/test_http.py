"""The `http` reader against a scripted local HTTP server (no network beyond 127.0.0.1)."""

from __future__ import annotations

import datetime
import email.utils
import json
import logging
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dativo.config import parse_job
from dativo.connectors import http as http_reader
from dativo.connectors.http import HttpReader, parse_link_header
from dativo.errors import PluginError
from dativo.sdk import NetworkDestination, PluginConfigError, PluginContext, SourceError
from dativo.state import StateStore
from dativo.supervisor import RunOptions, run_job
from tests.http_api import Api, Handler, Reply, Request

TOKEN = "s3cr3t-token-never-shown"


@pytest.fixture
def api() -> Iterator[Api]:
    server = Api()
    yield server
    server.close()


@dataclass
class Result:
    table: pa.Table
    state: dict[str, Any] | None
    sleeps: list[float]
    batches: list[int]


def read(
    api: Api,
    config: dict[str, Any],
    *,
    state: dict[str, Any] | None = None,
    batch_size: int = 1000,
    network: dict[str, NetworkDestination] | None = None,
) -> Result:
    if network is None:
        network = {api.destination: NetworkDestination(api.destination, "127.0.0.1", api.port)}
    context = PluginContext(run_id="r1", role="reader", state=state, network=network)
    reader = HttpReader()
    sleeps: list[float] = []
    reader.sleep = sleeps.append
    try:
        reader.initialize({"url": api.url(), **config}, context)
        schema = reader.get_schema()
        batches = list(reader.read_batch(batch_size))
        new_state = reader.get_incremental_state()
    finally:
        reader.close()
    assert all(b.schema.equals(schema) for b in batches)
    table = pa.Table.from_batches(batches, schema=schema)
    return Result(table, new_state, sleeps, [b.num_rows for b in batches])


def ids(result: Result) -> list[Any]:
    return result.table.column("id").to_pylist()


ROWS = [{"id": i, "name": f"n{i}"} for i in range(1, 8)]


# -- pagination ---------------------------------------------------------------------------------


def test_no_pagination_reads_the_top_level_array_in_batches(api: Api) -> None:
    api.handler = lambda _req: Reply(body=ROWS)
    result = read(api, {}, batch_size=3)
    assert ids(result) == list(range(1, 8))
    assert result.batches == [3, 3, 1]
    assert result.table.schema == pa.schema([("id", pa.int64()), ("name", pa.string())])
    (request,) = api.requests
    assert request.headers["host"] == api.destination
    assert request.headers["accept"] == "application/json"


def test_cursor_pagination_sends_the_cursor_back(api: Api) -> None:
    def handler(req: Request) -> Reply:
        start = int(req.query.get("after", "0"))
        page = ROWS[start : start + 3]
        more = start + 3 < len(ROWS)
        return Reply(
            body={"data": {"items": page}, "meta": {"next": str(start + 3) if more else None}}
        )

    api.handler = handler
    config = {
        "records": "data.items",
        "params": {"fields": "all"},
        "pagination": {"type": "cursor", "cursor_path": "meta.next", "cursor_param": "after"},
    }
    assert ids(read(api, config)) == list(range(1, 8))
    assert [r.query.get("after") for r in api.requests] == [None, "3", "6"]
    assert all(r.query["fields"] == "all" for r in api.requests)


def test_cursor_pagination_can_follow_a_next_url(api: Api) -> None:
    def handler(req: Request) -> Reply:
        start = int(req.query.get("from", "0"))
        nxt = f"/items?from={start + 4}" if start + 4 < len(ROWS) else None
        return Reply(body={"items": ROWS[start : start + 4], "next": nxt})

    api.handler = handler
    config = {"records": "items", "pagination": {"type": "cursor", "cursor_path": "next"}}
    assert ids(read(api, config)) == list(range(1, 8))
    assert len(api.requests) == 2


def test_offset_pagination_stops_at_a_short_page(api: Api) -> None:
    def handler(req: Request) -> Reply:
        offset, limit = int(req.query["skip"]), int(req.query["take"])
        return Reply(body=ROWS[offset : offset + limit])

    api.handler = handler
    config = {
        "pagination": {"type": "offset", "offset_param": "skip", "limit_param": "take", "limit": 3}
    }
    assert ids(read(api, config)) == list(range(1, 8))
    assert [(r.query["skip"], r.query["take"]) for r in api.requests] == [
        ("0", "3"),
        ("3", "3"),
        ("6", "3"),
    ]


def test_page_pagination_stops_at_an_empty_page(api: Api) -> None:
    def handler(req: Request) -> Reply:
        page = int(req.query["p"])
        return Reply(body={"results": ROWS[(page - 1) * 4 : page * 4]})

    api.handler = handler
    config = {"records": "results", "pagination": {"type": "page", "page_param": "p", "start": 1}}
    assert ids(read(api, config)) == list(range(1, 8))
    assert [r.query["p"] for r in api.requests] == ["1", "2", "3"]


def test_link_pagination_follows_rel_next(api: Api) -> None:
    def handler(req: Request) -> Reply:
        page = int(req.query.get("page", "1"))
        links = [f'<{api.url()}?page=1>; rel="first"']
        if page < 3:
            links.append(f'</items?page={page + 1}>; rel="next"')
        return Reply(body=ROWS[(page - 1) * 3 : page * 3], headers={"Link": ", ".join(links)})

    api.handler = handler
    assert ids(read(api, {"pagination": {"type": "link"}})) == list(range(1, 8))
    assert len(api.requests) == 3


def test_parse_link_header() -> None:
    value = '<https://a.test/x?p=2>; rel="next last", <https://a.test/x?p=1>; rel=prev'
    assert parse_link_header(value) == {
        "next": "https://a.test/x?p=2",
        "last": "https://a.test/x?p=2",
        "prev": "https://a.test/x?p=1",
    }


def test_max_pages_stops_an_endless_api(api: Api) -> None:
    api.handler = lambda req: Reply(body=ROWS[:1], headers={"Link": '</items?again=1>; rel="next"'})
    with pytest.raises(SourceError, match=r"`max_pages` \(3\)"):
        read(api, {"pagination": {"type": "link"}, "max_pages": 3})
    assert len(api.requests) == 3


def test_a_next_page_on_an_ungranted_host_is_refused(api: Api) -> None:
    api.handler = lambda _req: Reply(
        body=ROWS, headers={"Link": '<https://elsewhere.example/items?p=2>; rel="next"'}
    )
    with pytest.raises(SourceError) as caught:
        read(api, {"pagination": {"type": "link"}})
    assert "`elsewhere.example:443`, which the job does not grant" in str(caught.value)
    assert len(api.requests) == 1


def test_post_sends_the_json_body(api: Api) -> None:
    api.handler = lambda req: Reply(body={"rows": json.loads(req.body)["want"]})
    config = {"method": "POST", "body": {"want": ROWS[:2]}, "records": "rows"}
    assert ids(read(api, config)) == [1, 2]
    assert api.requests[0].headers["content-type"] == "application/json"


# -- networking -----------------------------------------------------------------------------------


def test_a_granted_name_is_reached_through_its_destination_with_the_original_host(
    api: Api,
) -> None:
    api.handler = lambda _req: Reply(body=ROWS)
    grant = "api.example.test:8443"
    network = {grant: NetworkDestination(grant, "127.0.0.1", api.port)}
    context = PluginContext(run_id="r1", role="reader", network=network)
    reader = HttpReader()
    reader.initialize({"url": "http://API.example.test:8443/v1/items?x=1"}, context)
    reader.get_schema()
    assert sum(b.num_rows for b in reader.read_batch(100)) == 7
    assert api.requests[0].headers["host"] == "api.example.test:8443"
    assert api.requests[0].path == "/v1/items"


def test_an_ungranted_url_names_the_grant_to_add(api: Api) -> None:
    context = PluginContext(run_id="r1", role="reader", network={})
    with pytest.raises(PluginConfigError) as caught:
        HttpReader().initialize({"url": "https://api.example.com/v1/items"}, context)
    message = str(caught.value)
    assert "`api.example.com:443`, which the job does not grant" in message
    assert "add `network: [api.example.com:443]`" in message


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"url": "ftp://x.test/"}, "must start with `http://` or `https://`"),
        ({"url": "https://u:p@x.test/"}, "must not carry credentials"),
        ({"url": "https://x.test/", "body": {"a": 1}}, "`body` is sent only with `method: POST`"),
        (
            {"url": "https://x.test/", "pagination": {"type": "cursor"}},
            "`type: cursor` needs `cursor_path`",
        ),
        (
            {"url": "https://x.test/", "pagination": {"type": "link", "page_param": "p"}},
            "`page_param` do(es) not apply to `type: link`",
        ),
        ({"url": "https://x.test/", "headers": {"Host": "y"}}, "set by the reader itself"),
        ({"url": "https://x.test/", "schema": {"a": "int99"}}, "unknown type `int99`"),
        ({"url": "https://x.test/", "colour": 1}, "unknown key `colour`"),
    ],
)
def test_config_errors(config: dict[str, Any], message: str) -> None:
    context = PluginContext(run_id="r1", role="reader")
    with pytest.raises(PluginConfigError) as caught:
        HttpReader().initialize(config, context)
    assert message in str(caught.value)


@dataclass
class Pki:
    ca_file: Path
    server: ssl.SSLContext
    server_names: list[str | None]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A private CA and a server certificate for `api.example.test` signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.UTC)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test ca"))
        .issuer_name(name("test ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("api.example.test"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("api.example.test")]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "server.pem").write_bytes(cert.public_bytes(pem))
    (directory / "server.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(directory / "server.pem", directory / "server.key")
    names: list[str | None] = []

    def record_sni(_sock: ssl.SSLObject, sni: str | None, _ctx: ssl.SSLContext) -> None:
        names.append(sni)

    server.sni_callback = record_sni
    return Pki(directory / "ca.pem", server, names)


@pytest.fixture
def https_api(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    """An https server for `api.example.test`; the reader trusts the test CA only."""

    def trust_test_ca() -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(pki.ca_file))

    monkeypatch.setattr(http_reader, "tls_context", trust_test_ca)
    pki.server_names.clear()
    server = Api(tls=pki.server)
    yield server
    server.close()


def https_read(api: Api, host: str) -> Result:
    grant = f"{host}:443"
    network = {grant: NetworkDestination(grant, "127.0.0.1", api.port)}
    context = PluginContext(run_id="r1", role="reader", network=network)
    reader = HttpReader()
    reader.initialize({"url": f"https://{host}/v1/items", "retry": {"attempts": 1}}, context)
    schema = reader.get_schema()
    batches = list(reader.read_batch(100))
    return Result(pa.Table.from_batches(batches, schema=schema), None, [], [])


def test_https_verifies_the_original_host_through_the_destination(https_api: Api, pki: Pki) -> None:
    https_api.handler = lambda _req: Reply(body=ROWS)
    assert ids(https_read(https_api, "api.example.test")) == list(range(1, 8))
    assert pki.server_names == ["api.example.test"]  # SNI: the URL's host, not 127.0.0.1
    assert https_api.requests[0].headers["host"] == "api.example.test"


def test_https_refuses_a_certificate_for_another_host(https_api: Api) -> None:
    https_api.handler = lambda _req: Reply(body=ROWS)
    with pytest.raises(SourceError) as caught:
        https_read(https_api, "other.example.test")
    assert "TLS certificate is not valid for `other.example.test`" in str(caught.value)
    assert https_api.requests == []


# -- retries ------------------------------------------------------------------------------------


def test_429_with_retry_after_and_503_are_retried(api: Api) -> None:
    script = iter(
        [
            Reply(429, {"error": "slow down"}, {"Retry-After": "7"}),
            Reply(503, {"error": "busy"}),
            Reply(body=ROWS),
        ]
    )
    api.handler = lambda _req: next(script)
    result = read(api, {"retry": {"attempts": 3, "backoff": 2, "max_backoff": 30}})
    assert ids(result) == list(range(1, 8))
    assert len(api.requests) == 3
    assert result.sleeps[0] == 7.0  # Retry-After, honoured
    assert 2.0 <= result.sleeps[1] <= 4.0  # second retry: 2s doubled, with jitter


def test_retry_after_as_an_http_date(api: Api) -> None:
    later = email.utils.formatdate(time.time() + 20, usegmt=True)
    script = iter([Reply(429, {}, {"Retry-After": later}), Reply(body=ROWS)])
    api.handler = lambda _req: next(script)
    result = read(api, {"retry": {"attempts": 2, "max_backoff": "1m"}})
    assert len(result.sleeps) == 1
    assert 0 < result.sleeps[0] <= 21


def test_retry_after_is_capped_by_max_backoff(api: Api) -> None:
    script = iter([Reply(503, {}, {"Retry-After": "3600"}), Reply(body=ROWS)])
    api.handler = lambda _req: next(script)
    assert read(api, {"retry": {"max_backoff": 5}}).sleeps == [5.0]


def test_gives_up_after_the_attempts(api: Api) -> None:
    api.handler = lambda _req: Reply(503, {"error": "down"})
    with pytest.raises(SourceError) as caught:
        read(api, {"retry": {"attempts": 3, "backoff": 0.5}})
    message = str(caught.value)
    assert "gave up after 3 attempt(s)" in message
    assert "HTTP 503" in message
    assert caught.value.transient
    assert len(api.requests) == 3


def test_connection_errors_are_retried_then_reported(api: Api) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    grant = f"127.0.0.1:{port}"
    network = {grant: NetworkDestination(grant, "127.0.0.1", port)}
    context = PluginContext(run_id="r1", role="reader", network=network)
    reader = HttpReader()
    sleeps: list[float] = []
    reader.sleep = sleeps.append
    reader.initialize({"url": f"http://{grant}/x", "retry": {"attempts": 2}}, context)
    with pytest.raises(SourceError, match="refused the connection") as caught:
        reader.get_schema()
    assert "gave up after 2 attempt(s)" in str(caught.value)
    assert len(sleeps) == 1


# -- errors -------------------------------------------------------------------------------------


def test_a_response_that_is_not_json(api: Api) -> None:
    api.handler = lambda _req: Reply(
        body=b"<html>maintenance</html>", headers={"Content-Type": "text/html"}
    )
    with pytest.raises(SourceError) as caught:
        read(api, {})
    message = str(caught.value)
    assert "page 1" in message
    assert "`text/html` that is not JSON" in message
    assert "<html>maintenance" in message


def test_401_is_terminal_and_never_shows_the_token(api: Api) -> None:
    api.handler = lambda req: Reply(
        401, {"error": f"invalid token {req.headers['authorization'].split()[1]}"}
    )
    config = {
        "headers": {"Authorization": f"Bearer {TOKEN}", "X-Api-Key": TOKEN + "-2"},
        "params": {"api_key": "k3y-in-the-query"},
    }
    with pytest.raises(SourceError) as caught:
        read(api, config)
    message = str(caught.value)
    assert "HTTP 401" in message
    assert "check the credentials in `headers`" in message
    assert "invalid token ***" in message
    assert TOKEN not in message
    assert "k3y-in-the-query" not in message  # the query string is never shown
    assert not caught.value.transient
    assert len(api.requests) == 1  # a 4xx is not retried
    assert api.requests[0].headers["authorization"] == f"Bearer {TOKEN}"


def test_a_missing_records_path_names_the_keys_found(api: Api) -> None:
    api.handler = lambda _req: Reply(body={"data": {"rows": ROWS, "total": 7}})
    with pytest.raises(SourceError) as caught:
        read(api, {"records": "data.items"})
    message = str(caught.value)
    assert "the response has no `data.items`" in message
    assert "`data` is an object with keys `rows`, `total`" in message


def test_an_object_response_needs_records(api: Api) -> None:
    api.handler = lambda _req: Reply(body={"items": ROWS})
    with pytest.raises(SourceError, match="set `records`"):
        read(api, {})


# -- schema -------------------------------------------------------------------------------------

NESTED = [
    {
        "id": 1,
        "user": {"name": "ann", "address": {"city": "Oslo"}},
        "tags": ["a", "b"],
        "lines": [{"sku": "x", "qty": 2}],
    },
    {"id": 2, "user": {"name": "bob", "address": None}, "tags": [], "lines": []},
]


def test_flatten_makes_dotted_columns_and_keeps_lists(api: Api) -> None:
    api.handler = lambda _req: Reply(body=NESTED)
    table = read(api, {}).table
    assert table.schema == pa.schema(
        [
            ("id", pa.int64()),
            ("user.name", pa.string()),
            ("user.address.city", pa.string()),
            ("tags", pa.list_(pa.string())),
            ("lines", pa.list_(pa.struct([("sku", pa.string()), ("qty", pa.int64())]))),
            ("user.address", pa.string()),
        ]
    )
    assert table.column("user.address.city").to_pylist() == ["Oslo", None]
    assert table.column("lines").to_pylist() == [[{"sku": "x", "qty": 2}], []]


def test_struct_keeps_nested_objects(api: Api) -> None:
    api.handler = lambda _req: Reply(body=NESTED)
    table = read(api, {"nested": "struct"}).table
    assert table.schema.names == ["id", "user", "tags", "lines"]
    assert table.schema.field("user").type == pa.struct(
        [("name", pa.string()), ("address", pa.struct([("city", pa.string())]))]
    )
    assert table.column("user").to_pylist()[1] == {"name": "bob", "address": None}


def paged(*pages: list[dict[str, Any]]) -> Handler:
    def handler(req: Request) -> Reply:
        page = int(req.query["page"])
        return Reply(body=pages[page - 1] if page <= len(pages) else [])

    return handler


def test_later_pages_are_cast_to_the_first_pages_schema(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    api.handler = paged(
        [{"id": 1, "amount": 1.5, "note": None}],
        [{"id": 2, "amount": 2, "note": "x", "extra": True}],
        [{"id": 3, "extra": False}],
    )
    with caplog.at_level(logging.WARNING, logger="dativo.plugin"):
        table = read(api, {"pagination": {"type": "page"}}).table
    assert table.schema == pa.schema(
        [("id", pa.int64()), ("amount", pa.float64()), ("note", pa.string())]
    )
    assert table.to_pylist() == [
        {"id": 1, "amount": 1.5, "note": None},
        {"id": 2, "amount": 2.0, "note": "x"},
        {"id": 3, "amount": None, "note": None},
    ]
    warnings = [r.getMessage() for r in caplog.records if "ignoring them" in r.getMessage()]
    assert len(warnings) == 1
    assert "`extra`" in warnings[0]


def test_a_value_that_does_not_cast_names_field_and_page(api: Api) -> None:
    api.handler = paged([{"id": 1}], [{"id": 2}], [{"id": "three"}])
    with pytest.raises(SourceError) as caught:
        read(api, {"pagination": {"type": "page"}})
    message = str(caught.value)
    assert "page 3: field `id` cannot be read as int64" in message
    assert '"three"' in message
    assert "Declare its type under `schema`" in message


def test_a_fraction_is_not_truncated_into_an_integer(api: Api) -> None:
    api.handler = paged([{"id": 1, "n": 1}], [{"id": 2, "n": 2.5}])
    with pytest.raises(SourceError, match="page 2: field `n` cannot be read as int64"):
        read(api, {"pagination": {"type": "page"}})


def test_struct_columns_take_objects_with_other_keys(api: Api) -> None:
    api.handler = paged(
        [{"id": 1, "user": {"name": "ann", "age": 3}}], [{"id": 2, "user": {"name": "bob"}}]
    )
    table = read(api, {"pagination": {"type": "page"}, "nested": "struct"}).table
    assert table.column("user").to_pylist() == [
        {"name": "ann", "age": 3},
        {"name": "bob", "age": None},
    ]


def test_a_declared_schema_casts_every_page(api: Api) -> None:
    api.handler = lambda _req: Reply(
        body=[
            {"id": "1", "at": "2024-05-01T10:00:00Z", "amount": "12.50", "other": 1},
            {"id": 2, "at": "2024-05-02T11:30:00+00:00", "amount": 3, "day": "2024-05-02"},
        ]
    )
    schema = {
        "id": "int64",
        "at": "timestamp[us, UTC]",
        "amount": "decimal128(10,2)",
        "day": "date32",
    }
    table = read(api, {"schema": schema}).table
    assert table.schema == pa.schema(
        [
            ("id", pa.int64()),
            ("at", pa.timestamp("us", tz="UTC")),
            ("amount", pa.decimal128(10, 2)),
            ("day", pa.date32()),
        ]
    )
    assert table.column("id").to_pylist() == [1, 2]
    assert str(table.column("amount").to_pylist()[0]) == "12.50"


def test_no_records_needs_a_declared_schema(api: Api) -> None:
    api.handler = lambda _req: Reply(body=[])
    with pytest.raises(SourceError, match="no schema to infer"):
        read(api, {})
    result = read(api, {"schema": {"id": "int64"}})
    assert result.table.num_rows == 0
    assert result.table.schema == pa.schema([("id", pa.int64())])


# -- incremental --------------------------------------------------------------------------------


def cursor(state: dict[str, Any] | None) -> dict[str, Any]:
    assert state is not None
    return {k: v for k, v in state.items() if k != "schema"}


class Changes:
    """An API of records with `updated_at`, filtered by `updated_since` (exclusive)."""

    def __init__(self) -> None:
        self.rows: dict[int, str] = {}

    def handler(self, req: Request) -> Reply:
        since = req.query.get("updated_since")
        rows = sorted(
            ({"id": i, "updated_at": t} for i, t in self.rows.items()),
            key=lambda r: r["updated_at"],
        )
        if since is not None:
            rows = [r for r in rows if r["updated_at"] > since]
        offset = int(req.query["offset"])
        return Reply(body={"data": rows[offset : offset + 2]})


def test_incremental_across_three_runs(api: Api) -> None:
    changes = Changes()
    api.handler = changes.handler
    config = {
        "records": "data",
        "pagination": {"type": "offset", "limit": 2},
        "incremental": {
            "field": "updated_at",
            "param": "updated_since",
            "start": "2024-01-01T00:00:00Z",
        },
    }
    changes.rows = {1: "2024-01-02T00:00:00Z", 2: "2024-01-03T00:00:00Z", 3: "2024-01-04T00:00:00Z"}
    first = read(api, config)
    assert sorted(ids(first)) == [1, 2, 3]
    assert cursor(first.state) == {"field": "updated_at", "cursor": "2024-01-04T00:00:00Z"}
    assert api.requests[0].query["updated_since"] == "2024-01-01T00:00:00Z"

    changes.rows[2] = "2024-01-05T00:00:00Z"  # updated
    changes.rows[4] = "2024-01-06T00:00:00Z"  # new
    api.requests.clear()
    second = read(api, config, state=first.state)
    assert sorted(ids(second)) == [2, 4]
    assert cursor(second.state) == {"field": "updated_at", "cursor": "2024-01-06T00:00:00Z"}
    assert {r.query["updated_since"] for r in api.requests} == {"2024-01-04T00:00:00Z"}

    third = read(api, config, state=second.state)
    assert third.table.num_rows == 0
    assert third.table.schema == first.table.schema  # remembered: nothing to infer from
    assert third.state == second.state


def test_incremental_compares_timestamps_not_text(api: Api) -> None:
    api.handler = lambda _req: Reply(
        body=[
            {"id": 1, "ts": "2024-01-01T12:00:00+02:00"},  # 10:00 UTC
            {"id": 2, "ts": "2024-01-01T11:00:00Z"},  # later, though smaller as text
            {"id": 3, "ts": None},
        ]
    )
    config = {"incremental": {"field": "ts", "param": "since"}}
    result = read(api, config)
    assert cursor(result.state) == {"field": "ts", "cursor": "2024-01-01T11:00:00Z"}
    assert "since" not in api.requests[0].query  # no start, no state: everything


def test_incremental_numbers(api: Api) -> None:
    api.handler = lambda _req: Reply(body=[{"id": 1, "v": 9}, {"id": 2, "v": 10}])
    config = {"incremental": {"field": "v", "param": "after"}}
    result = read(api, config, state={"field": "v", "cursor": 8})
    assert cursor(result.state) == {"field": "v", "cursor": 10}
    assert api.requests[0].query["after"] == "8"


def test_incremental_rejects_a_value_that_is_no_cursor(api: Api) -> None:
    api.handler = lambda _req: Reply(body=[{"id": 1, "ts": "yesterday"}])
    with pytest.raises(SourceError, match="neither an ISO-8601 timestamp nor a number"):
        read(api, {"incremental": {"field": "ts", "param": "since"}})


# -- end to end ---------------------------------------------------------------------------------


def test_a_run_through_the_supervisor_writes_parquet(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATIVO_TEST_HTTP_TOKEN", TOKEN)

    def handler(req: Request) -> Reply:
        if req.headers.get("authorization") != f"Bearer {TOKEN}":
            return Reply(401, {"error": "who are you"})
        page = int(req.query["page"])
        return Reply(body={"data": {"items": NESTED if page == 1 else []}})

    api.handler = handler
    job = parse_job(
        {
            "version": 1,
            "name": "http-e2e",
            "source": {
                "reader": {
                    "type": "builtin",
                    "name": "http",
                    "network": [api.destination],
                    "config": {
                        "url": api.url(),
                        "headers": {"Authorization": "Bearer ${DATIVO_TEST_HTTP_TOKEN}"},
                        "records": "data.items",
                        "pagination": {"type": "page"},
                    },
                }
            },
            "target": {"path": "out", "writer": {"type": "builtin", "name": "parquet"}},
        },
        base_dir=tmp_path,
    )
    report = run_job(job, RunOptions(in_process=True))
    assert report.rows == 2
    files = sorted(p for p in (tmp_path / "out").rglob("*.parquet") if ".dativo" not in str(p))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    assert table.column("id").to_pylist() == [1, 2]
    assert table.column("user.name").to_pylist() == ["ann", "bob"]
    assert table.column("tags").to_pylist() == [["a", "b"], []]


def test_a_failed_run_never_shows_the_token(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATIVO_TEST_HTTP_TOKEN", TOKEN)
    api.handler = lambda req: Reply(403, {"echo": req.headers.get("authorization")})
    job = parse_job(
        {
            "version": 1,
            "name": "http-e2e",
            "source": {
                "reader": {
                    "type": "builtin",
                    "name": "http",
                    "network": [api.destination],
                    "config": {
                        "url": api.url(),
                        "headers": {"Authorization": "Bearer ${DATIVO_TEST_HTTP_TOKEN}"},
                    },
                }
            },
            "target": {"path": "out", "writer": {"type": "builtin", "name": "parquet"}},
        },
        base_dir=tmp_path,
    )
    with pytest.raises(PluginError) as caught:
        run_job(job, RunOptions(in_process=True))
    assert "HTTP 403" in str(caught.value)
    assert TOKEN not in str(caught.value)


def test_incremental_runs_through_the_supervisor_save_the_cursor(api: Api, tmp_path: Path) -> None:
    changes = Changes()
    changes.rows = {1: "2024-01-02T00:00:00Z", 2: "2024-01-03T00:00:00Z", 3: "2024-01-04T00:00:00Z"}
    api.handler = changes.handler
    job = parse_job(
        {
            "version": 1,
            "name": "http-incremental",
            "source": {
                "reader": {
                    "type": "builtin",
                    "name": "http",
                    "network": [api.destination],
                    "config": {
                        "url": api.url(),
                        "records": "data",
                        "pagination": {"type": "offset", "limit": 2},
                        "incremental": {"field": "updated_at", "param": "updated_since"},
                    },
                }
            },
            "target": {"path": "out", "writer": {"type": "builtin", "name": "parquet"}},
        },
        base_dir=tmp_path,
    )
    first = run_job(job, RunOptions(in_process=True))
    second = run_job(job, RunOptions(in_process=True))  # nothing changed: no rows, no columns
    changes.rows[3] = "2024-01-09T00:00:00Z"
    third = run_job(job, RunOptions(in_process=True))
    assert (first.rows, second.rows, third.rows) == (3, 0, 1)
    saved = StateStore(job.state_path).describe("http-incremental")
    assert saved is not None
    assert cursor(saved["state"]) == {"field": "updated_at", "cursor": "2024-01-09T00:00:00Z"}
    files = sorted(p for p in (tmp_path / "out").rglob("*.parquet") if ".dativo" not in str(p))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    assert sorted(table.column("id").to_pylist()) == [1, 2, 3, 3]
