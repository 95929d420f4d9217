"""The `http` reader: JSON REST APIs, page by page, as Arrow record batches.

Each request fetches one page; its records (the array at `records` in the JSON response) become
record batches of at most `batch_size` rows before the next page is requested, so memory stays
bounded by one page. Pagination styles: `cursor` (a value in the response sent back as a query
parameter, or a next-page URL), `offset`, `page` and `link` (RFC 8288 `Link: <...>; rel="next"`).

Networking: a plugin has no network of its own. The job grants `host:port` destinations and the
context says where each one is reached (`context.network`): a loopback relay inside a container,
the host itself in the unsandboxed in-process mode. The reader connects its TCP socket there,
but speaks to the original host: the `Host` header and, for https, TLS with SNI and certificate
verification use the host name of the URL. A URL whose `host:port` is not granted is refused.

Schema: a declared `schema` (column -> type string, as the `files` reader takes it) is exact;
without one, the schema is inferred from the first page that has records, and later pages are
cast to it. Nested objects are flattened into `a.b` columns (`nested: flatten`) or kept as
structs (`nested: struct`); arrays stay lists.

Incremental mode sends the saved cursor as a query parameter and saves the largest value of
`incremental.field` seen (ISO-8601 timestamps or numbers) as `{"field": ..., "cursor": ...}`,
with the inferred schema, which a later run that finds no new records declares.

Only the standard library speaks HTTP here (`http.client`, `ssl`): the plugin image has no HTTP
client package. See docs/http-api.md.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import email.utils
import gzip
import http.client
import ipaddress
import json
import logging
import random
import re
import socket
import ssl
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dativo import __version__
from dativo.config import parse_duration
from dativo.connectors import parse_plugin_config
from dativo.connectors.files import check_schema_mapping, parse_arrow_type
from dativo.sdk import (
    DataReader,
    NetworkDestination,
    PluginConfigError,
    PluginContext,
    SourceError,
)

__all__ = ["HttpReader", "HttpReaderConfig", "parse_link_header"]

_PLUGIN = "reader `http`"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_MAX_SNIPPET = 300
_MAX_KEYS_SHOWN = 20
_REDACTED = "***"
_MIN_SECRET = 3
_SECRET_NAME = re.compile(r"key|token|secret|passw|auth|sig|credential", re.IGNORECASE)

# ---------------------------------------------------------------------------------------------
# Config


_PAGINATION_KEYS: dict[str, set[str]] = {
    "none": set(),
    "cursor": {"cursor_path", "cursor_param"},
    "offset": {"offset_param", "limit_param", "limit", "start"},
    "page": {"page_param", "limit_param", "limit", "start"},
    "link": set(),
}


class Pagination(BaseModel):
    """How the reader gets from one page to the next."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["none", "cursor", "offset", "page", "link"] = Field(
        default="none", description="the pagination style"
    )
    cursor_path: str | None = Field(
        default=None,
        description="cursor: dotted path of the next cursor in the response, e.g. `meta.next`",
    )
    cursor_param: str | None = Field(
        default=None,
        description=(
            "cursor: query parameter that carries the cursor; without it the cursor is the URL "
            "of the next page"
        ),
    )
    offset_param: str = Field(default="offset", description="offset: the offset parameter")
    limit_param: str = Field(
        default="limit", description="offset and page: the page-size parameter"
    )
    limit: int | None = Field(
        default=None,
        ge=1,
        description="offset (default 100) and page (default: not sent): records per page",
    )
    page_param: str = Field(default="page", description="page: the page-number parameter")
    start: int | None = Field(
        default=None,
        ge=0,
        description="page: first page number (default 1); offset: first offset (default 0)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Pagination:
        allowed = _PAGINATION_KEYS[self.type] | {"type"}
        stray = sorted(self.model_fields_set - allowed)
        if stray:
            keys = ", ".join(f"`{k}`" for k in stray)
            valid = ", ".join(f"`{k}`" for k in sorted(allowed))
            raise ValueError(
                f"{keys} do(es) not apply to `type: {self.type}`; its keys are {valid}"
            )
        if self.type == "cursor" and not self.cursor_path:
            raise ValueError(
                "`type: cursor` needs `cursor_path`, the dotted path of the next cursor in the "
                "response (e.g. `meta.next_cursor`)"
            )
        return self

    @property
    def page_size(self) -> int | None:
        if self.type == "offset":
            return self.limit or 100
        return self.limit


class Retry(BaseModel):
    """Retries of a request that failed with 429, 5xx or a connection error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    attempts: int = Field(
        default=5, ge=1, le=100, description="tries per request, the first included"
    )
    backoff: float = Field(
        default=1.0, description="base delay in seconds, doubled at each retry (with jitter)"
    )
    max_backoff: float = Field(
        default=60.0, description="longest wait between two tries, `Retry-After` included"
    )

    @field_validator("backoff", "max_backoff", mode="before")
    @classmethod
    def _seconds(cls, value: object) -> float:
        return parse_duration(value)


class Incremental(BaseModel):
    """Read only what changed since the last successful run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    field: str = Field(
        min_length=1, description="dotted path of the change timestamp or number in a record"
    )
    param: str = Field(min_length=1, description="query parameter that takes the saved cursor")
    start: str | int | float | None = Field(
        default=None, description="cursor of the first run; default: no parameter sent"
    )


class HttpReaderConfig(BaseModel):
    """Config of the `http` reader."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(description="the first page: `http://` or `https://` URL")
    method: Literal["GET", "POST"] = Field(default="GET", description="`GET` or `POST`")
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="request headers; write secrets as `${ENV_VAR}` (e.g. `Bearer ${TOKEN}`)",
    )
    params: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="query parameters of every request"
    )
    body: dict[str, Any] | list[Any] | None = Field(
        default=None, description="JSON body of a `POST`"
    )
    records: str = Field(
        default="",
        description="dotted path of the array of records in the response; empty: the response",
    )
    pagination: Pagination = Field(default_factory=Pagination)
    max_pages: int = Field(
        default=10_000, ge=1, description="fail rather than fetch more pages than this"
    )
    retry: Retry = Field(default_factory=Retry)
    timeout: float = Field(default=30.0, description="seconds to connect and between reads")
    incremental: Incremental | None = Field(default=None)
    nested: Literal["flatten", "struct"] = Field(
        default="flatten",
        description="`flatten`: nested objects become `a.b` columns; `struct`: Arrow structs",
    )
    schema_: dict[str, str] | None = Field(
        default=None, alias="schema", description="column -> type; default: inferred"
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        _split_url(value)
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise ValueError(f"`{name[:40]}` is not a valid header name")
            if name.lower() in ("host", "content-length", "transfer-encoding", "connection"):
                raise ValueError(f"`{name}` is set by the reader itself; remove it")
        for name, text in value.items():
            if "\r" in text or "\n" in text:
                raise ValueError(f"the value of header `{name}` contains a line break")
        return value

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, value: object) -> float:
        seconds = parse_duration(value)
        if seconds <= 0:
            raise ValueError("must be more than 0 seconds, e.g. `30s`")
        return seconds

    @field_validator("schema_")
    @classmethod
    def _types(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return check_schema_mapping(value)

    @model_validator(mode="after")
    def _body_with_post(self) -> HttpReaderConfig:
        if self.body is not None and self.method != "POST":
            raise ValueError("`body` is sent only with `method: POST`; set it or remove `body`")
        return self


# ---------------------------------------------------------------------------------------------
# URLs, destinations and the wire


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # as in the URL, lower-case, IPv6 without brackets
    port: int
    path: str  # path and query, what goes on the request line

    @property
    def destination(self) -> str:
        host = self.host
        if ":" in host:
            host = f"[{ipaddress.IPv6Address(host).compressed}]"
        return f"{host}:{self.port}"

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def shown(self) -> str:
        """The URL without its query (which may carry secrets)."""
        return f"{self.scheme}://{self.host_header}{self.path.split('?', 1)[0]}"


def _split_url(url: str) -> _Target:
    """Check an absolute http(s) URL and split it; ValueError says what is wrong."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {exc}") from None
    if parts.scheme not in _DEFAULT_PORTS:
        raise ValueError("must start with `http://` or `https://`")
    if not parts.hostname:
        raise ValueError("names no host; write e.g. `https://api.example.com/v1/items`")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "must not carry credentials (`user:password@`); send them in `headers` "
            "as `${ENV_VAR}` instead"
        )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return _Target(parts.scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[parts.scheme], path)


def _with_query(url: str, extra: Mapping[str, Any]) -> str:
    """`url` with `extra` query parameters added (replacing ones of the same name)."""
    if not extra:
        return url
    parts = urlsplit(url)
    kept = [p for p in parts.query.split("&") if p and p.split("=", 1)[0] not in extra]
    query = "&".join([*kept, urlencode({k: _param_text(v) for k, v in extra.items()})])
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def _param_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_link_header(value: str) -> dict[str, str]:
    """The links of an RFC 8288 `Link` header value, by relation type (first one wins)."""
    links: dict[str, str] = {}
    for match in re.finditer(r"<([^>]*)>((?:\s*;\s*[^;,]+)*)", value):
        target, params = match.group(1), match.group(2)
        for param in params.split(";"):
            key, _, raw = param.strip().partition("=")
            if key.strip().lower() != "rel":
                continue
            for rel in raw.strip().strip('"').lower().split():
                links.setdefault(rel, target.strip())
    return links


class _TlsConnection(http.client.HTTPConnection):
    """An HTTPS connection whose socket goes to `host`:`port` (a relay) while TLS, SNI and
    certificate verification use `server_name`, the host of the URL."""

    default_port = 443

    def __init__(
        self,
        host: str,
        port: int,
        *,
        server_name: str,
        context: ssl.SSLContext,
        timeout: float,
    ) -> None:
        super().__init__(host, port, timeout=timeout)
        self._server_name = server_name
        self._tls = context

    def connect(self) -> None:
        super().connect()
        self.sock = self._tls.wrap_socket(self.sock, server_hostname=self._server_name)


def tls_context() -> ssl.SSLContext:
    """The TLS settings of every https request: system CAs, hostname checking, TLS 1.2+."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@dataclass
class _Response:
    status: int
    reason: str
    headers: http.client.HTTPMessage
    body: bytes


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a `Retry-After` header (seconds or an HTTP date), or None."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, when.timestamp() - now)


# ---------------------------------------------------------------------------------------------
# JSON -> Arrow


def _lookup(value: Any, path: str) -> tuple[bool, Any]:
    """(found, value) at the dotted `path` inside `value`; an empty path is `value` itself."""
    if not path:
        return True, value
    current = value
    for key in path.split("."):
        if not isinstance(current, dict) or key not in current:
            return False, None
        current = current[key]
    return True, current


def _flatten(record: dict[str, Any], prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            _flatten(value, name + ".", out)
        else:
            out[name] = None if isinstance(value, dict) else value
    return out


def _plain_type(dtype: pa.DataType) -> pa.DataType:
    """Null-typed parts of an inferred type read as string (a later page may fill them)."""
    if pa.types.is_null(dtype):
        return pa.string()
    if pa.types.is_struct(dtype):
        return pa.struct(
            [
                pa.field(f.name, _plain_type(f.type))
                for f in (dtype.field(i) for i in range(dtype.num_fields))
            ]
        )
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return pa.list_(pa.field(dtype.value_field.name, _plain_type(dtype.value_type)))
    return dtype


_ARROW_ERRORS = (pa.ArrowException, OverflowError, TypeError, ValueError)


def _order_key(value: Any) -> tuple[int, Any] | None:
    """A comparable key for an incremental cursor value: numbers, ISO-8601 times; else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float | Decimal):
        return (0, value)
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"-?\d+(\.\d+)?", text):
            return (0, Decimal(text))
        try:
            when = dt.datetime.fromisoformat(text)
        except ValueError:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        return (1, when)
    return None


# ---------------------------------------------------------------------------------------------
# The reader


class HttpReader(DataReader):
    """Reads records from a JSON HTTP API; see the module docstring and docs/http-api.md."""

    name = "http"
    version = "0.1.0"

    def __init__(self) -> None:
        self._config: HttpReaderConfig | None = None
        self._context: PluginContext | None = None
        self._declared: pa.Schema | None = None
        self._schema: pa.Schema | None = None
        self._pages: Iterator[tuple[int, list[Any]]] | None = None
        self._first: tuple[int, list[Any]] | None = None
        self._cursor: Any = None  # the incremental cursor this run started from
        self._max: Any = None  # the largest incremental value seen so far
        self._max_key: tuple[int, Any] | None = None
        self._ignored: set[str] = set()
        self._saved_schema: pa.Schema | None = None
        self._secrets: list[str] = []
        #: Waits between tries; tests replace it to record the delays instead.
        self.sleep = time.sleep

    # -- lifecycle ----------------------------------------------------------------------------

    def initialize(self, config: dict[str, Any], context: PluginContext) -> None:
        cfg = parse_plugin_config(HttpReaderConfig, config, _PLUGIN)
        self._config = cfg
        self._context = context
        target = _split_url(cfg.url)
        if target.destination not in context.network:
            granted = ", ".join(f"`{d}`" for d in sorted(context.network)) or "none"
            raise PluginConfigError(
                f"{_PLUGIN}: `url` points at `{target.destination}`, which the job does not grant "
                f"(granted: {granted}); add `network: [{target.destination}]` to the reader in "
                "the job file"
            )
        # Every header value may be a credential; parameters only under secret-looking names.
        secrets = [*cfg.headers.values()]
        secrets += [_param_text(v) for k, v in cfg.params.items() if _SECRET_NAME.search(k)]
        self._secrets = sorted({v for v in secrets if len(v) >= _MIN_SECRET}, key=len, reverse=True)
        if cfg.schema_ is not None:
            self._declared = pa.schema(
                [pa.field(n, parse_arrow_type(t)) for n, t in cfg.schema_.items()]
            )
        if cfg.incremental is not None:
            self._cursor = self._prior_cursor(cfg.incremental, context.state)
            if self._cursor is not None:
                self._max, self._max_key = self._cursor, _order_key(self._cursor)
        self._pages = self._fetch_pages()

    def get_schema(self) -> pa.Schema:
        if self._schema is None:
            self._schema = self._declared if self._declared is not None else self._infer()
        return self._schema

    def read_batch(self, batch_size: int) -> Iterator[pa.RecordBatch]:
        schema = self.get_schema()
        size = max(1, batch_size)
        pages = self._page_iter()
        if self._first is not None:
            first, self._first = self._first, None
            pages = _chain(first, pages)
        for number, records in pages:
            self._track(records, number)
            if not records:
                continue
            batch = self._to_batch(records, schema, number)
            for start in range(0, batch.num_rows, size):
                yield batch.slice(start, size)

    def get_incremental_state(self) -> dict[str, Any] | None:
        cfg = self._cfg()
        if cfg.incremental is None or self._max is None:
            return None
        state: dict[str, Any] = {"field": cfg.incremental.field, "cursor": self._max}
        if self._declared is None and self._schema is not None and len(self._schema):
            # A later run with no new records still declares these columns.
            state["schema"] = base64.b64encode(self._schema.serialize().to_pybytes()).decode()
        return state

    def close(self) -> None:
        self._pages = None

    # -- config and state ---------------------------------------------------------------------

    def _cfg(self) -> HttpReaderConfig:
        if self._config is None:
            raise RuntimeError("initialize() was not called")
        return self._config

    def _log(self) -> logging.Logger:
        assert self._context is not None
        return self._context.log

    def _prior_cursor(self, inc: Incremental, state: dict[str, Any] | None) -> Any:
        if not state:
            return inc.start
        cursor = state.get("cursor")
        saved = state.get("schema")
        if isinstance(saved, str):
            with contextlib.suppress(ValueError, pa.ArrowException):
                self._saved_schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(saved)))
        if not isinstance(state.get("field"), str) or _order_key(cursor) is None:
            raise SourceError(
                "the saved incremental state of this job is not of the form "
                '{"field": name, "cursor": timestamp or number}; reset the job\'s state to '
                "read from `incremental.start` again"
            )
        if state["field"] != inc.field:
            self._log().warning(
                "incremental.field is now `%s` but the saved cursor is of `%s`; reading from "
                "`incremental.start` again",
                inc.field,
                state["field"],
            )
            self._saved_schema = None
            return inc.start
        return cursor

    # -- pages --------------------------------------------------------------------------------

    def _page_iter(self) -> Iterator[tuple[int, list[Any]]]:
        if self._pages is None:
            raise RuntimeError("initialize() was not called")
        return self._pages

    def _infer(self) -> pa.Schema:
        """The schema of the first page that has records (pages before it have none)."""
        for number, records in self._page_iter():
            if records:
                schema = self._infer_page(records, number)
                self._first = (number, records)
                return schema
        if self._saved_schema is not None:
            self._log().info("no new records; declaring the columns of the last run")
            return self._saved_schema
        raise SourceError(
            "the API returned no records, so there is no schema to infer (and no earlier run "
            "saved one); declare `schema` (column -> type) to read an empty result"
        )

    def _fetch_pages(self) -> Iterator[tuple[int, list[Any]]]:
        """(page number from 1, records) of every page, following the pagination."""
        cfg = self._cfg()
        pag = cfg.pagination
        extra: dict[str, Any] = dict(cfg.params)
        if cfg.incremental is not None and self._cursor is not None:
            extra[cfg.incremental.param] = self._cursor
        offset = pag.start if pag.start is not None else 0
        page_no = pag.start if pag.start is not None else 1
        size = pag.page_size
        if pag.type == "offset":
            extra[pag.offset_param] = offset
            extra[pag.limit_param] = size
        elif pag.type == "page":
            extra[pag.page_param] = page_no
            if size is not None:
                extra[pag.limit_param] = size
        url = _with_query(cfg.url.strip(), extra)
        seen_cursors: set[str] = set()
        number = 0
        while True:
            number += 1
            if number > cfg.max_pages:
                raise SourceError(
                    f"stopped after `max_pages` ({cfg.max_pages}) pages while the API still "
                    "offers another; raise `max_pages` if the data really is that long"
                )
            document, response = self._get_json(url, number, first=number == 1)
            records = self._records(document, number)
            yield number, records
            following: str | None = None
            if pag.type == "cursor":
                assert pag.cursor_path is not None
                found, cursor = _lookup(document, pag.cursor_path)
                if not found or cursor in (None, "") or not records:
                    return
                text = _param_text(cursor)
                if text in seen_cursors:
                    raise SourceError(
                        f"page {number}: the API returned a cursor it returned before; stopping "
                        "rather than reading the same pages again (check `cursor_path`)"
                    )
                seen_cursors.add(text)
                if pag.cursor_param is not None:
                    following = _with_query(url, {pag.cursor_param: text})
                else:
                    following = urljoin(url, text)
            elif pag.type == "offset":
                assert size is not None
                if len(records) < size:
                    return
                offset += len(records)
                following = _with_query(url, {pag.offset_param: offset})
            elif pag.type == "page":
                if not records or (size is not None and len(records) < size):
                    return
                page_no += 1
                following = _with_query(url, {pag.page_param: page_no})
            elif pag.type == "link":
                links = parse_link_header(", ".join(response.headers.get_all("Link") or []))
                if "next" not in links:
                    return
                following = urljoin(url, links["next"])
            if following is None:
                return
            url = following

    def _records(self, document: Any, number: int) -> list[Any]:
        path = self._cfg().records
        found, records = _lookup(document, path)
        if not found:
            raise SourceError(
                f"page {number}: the response has no `{path}` (the `records` path); "
                f"{_describe_shape(document, path)}"
            )
        if not isinstance(records, list):
            where = f"`{path}`" if path else "the response"
            hint = (
                "; set `records` to the path of the array of records, e.g. `data.items`"
                if not path
                else ""
            )
            raise SourceError(
                f"page {number}: {where} is {_json_kind(records)}, not an array of records"
                f"{hint}; {_describe_shape(document, path)}"
            )
        bad = next((r for r in records if not isinstance(r, dict)), _MISSING)
        if bad is not _MISSING:
            raise SourceError(
                f"page {number}: a record is {_json_kind(bad)}; every record must be a JSON "
                "object (check `records`)"
            )
        return records

    # -- HTTP -----------------------------------------------------------------------------------

    def _get_json(self, url: str, number: int, *, first: bool) -> tuple[Any, _Response]:
        response = self._request(url, number)
        target = _split_url(url)
        kind = response.headers.get_content_type()
        try:
            text = response.body.decode(response.headers.get_content_charset() or "utf-8")
            return json.loads(text), response
        except (UnicodeDecodeError, json.JSONDecodeError, LookupError) as exc:
            raise SourceError(
                f"page {number}: {target.shown} answered {response.status} with "
                f"`{kind}` that is not JSON ({exc.__class__.__name__}: {self._scrub(str(exc))}); "
                f"it begins {self._snippet(response.body)!r}. Check `url`: this reader reads "
                "JSON APIs only"
            ) from None

    def _request(self, url: str, number: int) -> _Response:
        cfg = self._cfg()
        target = _split_url(url)
        destination = self._destination(target, number)
        attempts = cfg.retry.attempts
        for attempt in range(1, attempts + 1):
            try:
                response = self._send(target, destination)
            except _Retryable as exc:
                if attempt == attempts:
                    raise SourceError(
                        f"page {number}: {target.shown}: gave up after {attempts} "
                        f"attempt(s); the last one: {exc}. Raise `retry.attempts` or check "
                        "the API's status",
                        transient=True,
                    ) from None
                delay = self._delay(attempt, exc.retry_after)
                self._log().warning(
                    "page %d: %s: %s; retrying in %.1fs (attempt %d of %d)",
                    number,
                    target.shown,
                    exc,
                    delay,
                    attempt + 1,
                    attempts,
                )
                self.sleep(delay)
                continue
            return response
        raise AssertionError("unreachable")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        retry = self._cfg().retry
        if retry_after is not None:
            return min(retry.max_backoff, retry_after)
        base = min(retry.max_backoff, retry.backoff * 2 ** (attempt - 1))
        return float(base * random.uniform(0.5, 1.0))

    def _destination(self, target: _Target, number: int) -> NetworkDestination:
        assert self._context is not None
        found = self._context.network.get(target.destination)
        if found is None:
            raise SourceError(
                f"page {number}: the next page is at {target.shown}, on `{target.destination}`, "
                "which the job does not grant; add it to the reader's `network` in the job "
                "file if that host is to be trusted"
            )
        return found

    def _send(self, target: _Target, destination: NetworkDestination) -> _Response:
        cfg = self._cfg()
        headers = {
            "Host": target.host_header,
            "Accept": "application/json",
            "Accept-Encoding": "gzip, deflate",
            "User-Agent": f"dativo-http/{__version__}",
        }
        own = {name.lower() for name in cfg.headers}
        headers = {k: v for k, v in headers.items() if k.lower() not in own or k == "Host"}
        headers.update(cfg.headers)
        body: bytes | None = None
        if cfg.method == "POST":
            body = json.dumps(cfg.body if cfg.body is not None else {}).encode()
            headers.setdefault("Content-Type", "application/json")
        conn: http.client.HTTPConnection
        if target.scheme == "https":
            conn = _TlsConnection(
                destination.host,
                destination.port,
                server_name=target.host,
                context=tls_context(),
                timeout=cfg.timeout,
            )
        else:
            conn = http.client.HTTPConnection(
                destination.host, destination.port, timeout=cfg.timeout
            )
        try:
            try:
                conn.request(cfg.method, target.path, body=body, headers=headers)
                raw = conn.getresponse()
                data = raw.read()
            except ssl.SSLCertVerificationError as exc:
                raise SourceError(
                    f"{target.shown}: the server's TLS certificate is not valid for "
                    f"`{target.host}`: {exc.verify_message}"
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                raise _Retryable(_connection_problem(exc, destination)) from None
        finally:
            conn.close()
        data = self._decode(raw.headers.get("Content-Encoding"), data, target)
        response = _Response(raw.status, raw.reason, raw.headers, data)
        self._check_status(response, target)
        return response

    def _decode(self, encoding: str | None, data: bytes, target: _Target) -> bytes:
        kind = (encoding or "").strip().lower()
        try:
            if kind == "gzip":
                return gzip.decompress(data)
            if kind == "deflate":
                return zlib.decompress(data)
        except (OSError, zlib.error, EOFError) as exc:
            raise _Retryable(f"a {kind} body that does not decompress ({exc})") from None
        if kind not in ("", "identity"):
            raise SourceError(f"{target.shown}: unsupported Content-Encoding `{encoding}`")
        return data

    def _check_status(self, response: _Response, target: _Target) -> None:
        status = response.status
        if 200 <= status < 300:
            return
        said = f"HTTP {status} {response.reason}".strip()
        if status == 429 or status >= 500:
            wait = _retry_after(response.headers.get("Retry-After"), time.time())
            raise _Retryable(said, retry_after=wait)
        snippet = self._snippet(response.body)
        detail = f"; the server said {snippet!r}" if snippet else ""
        if 300 <= status < 400:
            location = response.headers.get("Location")
            moved = ""
            if location:
                with contextlib.suppress(ValueError):
                    moved = f" to {_split_url(urljoin(target.shown, location)).shown}"
            raise SourceError(
                f"{target.shown}: {said}: the API redirects{moved}; this reader does not follow "
                "redirects: set `url` to where it points (and grant that destination)"
            )
        hint = {
            401: "check the credentials in `headers` (their environment variables)",
            403: "check that the credentials in `headers` may read this resource",
            404: "check `url`",
        }.get(status, "check `url`, `params` and `body`")
        raise SourceError(f"{target.shown}: {said}{detail}; {hint}")

    def _snippet(self, body: bytes) -> str:
        text = body[: _MAX_SNIPPET * 2].decode("utf-8", errors="replace").strip()
        text = self._scrub(text)
        return text if len(text) <= _MAX_SNIPPET else text[:_MAX_SNIPPET] + "..."

    def _scrub(self, text: str) -> str:
        """`text` with every header and parameter value of the config masked."""
        for secret in self._secrets:
            text = text.replace(secret, _REDACTED)
            # A bearer token is often echoed without its scheme.
            _, _, token = secret.partition(" ")
            if len(token) >= _MIN_SECRET:
                text = text.replace(token, _REDACTED)
        return text

    # -- records -> batches -------------------------------------------------------------------

    def _rows(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self._cfg().nested == "flatten":
            return [_flatten(r, "", {}) for r in records]
        return records

    @staticmethod
    def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
        names: dict[str, None] = {}
        for row in rows:
            names.update(dict.fromkeys(row))
        return {name: [row.get(name) for row in rows] for name in names}

    def _infer_page(self, records: list[dict[str, Any]], number: int) -> pa.Schema:
        fields = []
        for name, values in self._columns(self._rows(records)).items():
            try:
                array = pa.array(values)
            except _ARROW_ERRORS as exc:
                raise SourceError(
                    f"page {number}: field `{name}` has values of different JSON types "
                    f"({exc}); declare its type under `schema`"
                ) from None
            fields.append(pa.field(name, _plain_type(array.type)))
        return pa.schema(fields)

    def _to_batch(
        self, records: list[dict[str, Any]], schema: pa.Schema, number: int
    ) -> pa.RecordBatch:
        columns = self._columns(self._rows(records))
        unknown = [n for n in columns if schema.get_field_index(n) < 0 and n not in self._ignored]
        if unknown:
            self._ignored.update(unknown)
            self._log().warning(
                "page %d: field(s) %s are not in the %s schema; ignoring them",
                number,
                ", ".join(f"`{n}`" for n in unknown[:_MAX_KEYS_SHOWN]),
                "declared" if self._declared is not None else "inferred (first page's)",
            )
        arrays = []
        for field in schema:
            values = columns.get(field.name)
            if values is None:
                arrays.append(pa.nulls(len(records), field.type))
                continue
            arrays.append(self._cast(values, field, number))
        return pa.RecordBatch.from_arrays(arrays, schema=schema)

    def _cast(self, values: list[Any], field: pa.Field, number: int) -> pa.Array:
        # Infer, then cast with checks: `pa.array(values, type=int64)` would truncate 2.5 to 2.
        nested = pa.types.is_struct(field.type) or pa.types.is_list(field.type)
        try:
            try:
                array = pa.array(values)
            except _ARROW_ERRORS:
                if nested:
                    return pa.array(values, type=field.type)
                # Mixed JSON scalars (`"1"` and `2`): read them all as text, then cast.
                if not all(v is None or isinstance(v, str | int | float) for v in values):
                    raise
                array = pa.array([None if v is None else _param_text(v) for v in values])
            try:
                return pc.cast(array, field.type, safe=True)
            except _ARROW_ERRORS:
                if not nested:
                    raise
                # Objects with other keys than the first page's: missing ones are null.
                return pa.array(values, type=field.type)
        except _ARROW_ERRORS as exc:
            example = next((v for v in values if v is not None and not _fits(v, field.type)), None)
            shown = "" if example is None else f" (e.g. {_short(example)})"
            origin = "declared" if self._declared is not None else "inferred from the first page"
            raise SourceError(
                f"page {number}: field `{field.name}` cannot be read as {field.type}, the type "
                f"{origin}{shown}: {self._scrub(str(exc))}. "
                + (
                    "Fix the data or its `schema` type."
                    if self._declared is not None
                    else "Declare its type under `schema` (e.g. `string`)."
                )
            ) from None

    # -- incremental --------------------------------------------------------------------------

    def _track(self, records: list[dict[str, Any]], number: int) -> None:
        inc = self._cfg().incremental
        if inc is None:
            return
        for record in records:
            found, value = _lookup(record, inc.field)
            if not found or value is None:
                continue
            key = _order_key(value)
            if key is None:
                raise SourceError(
                    f"page {number}: `{inc.field}` (the `incremental.field`) is "
                    f"{_short(value)}, neither an ISO-8601 timestamp nor a number"
                )
            if self._max_key is not None and key[0] != self._max_key[0]:
                raise SourceError(
                    f"page {number}: `{inc.field}` is {_short(value)} but the cursor so far "
                    f"is {_short(self._max)}; a cursor must always be a timestamp or always a "
                    "number"
                )
            if self._max_key is None or key[1] > self._max_key[1]:
                self._max, self._max_key = value, key


_MISSING = object()


def _chain(
    first: tuple[int, list[Any]], rest: Iterator[tuple[int, list[Any]]]
) -> Iterator[tuple[int, list[Any]]]:
    yield first
    yield from rest


def _fits(value: Any, dtype: pa.DataType) -> bool:
    try:
        pc.cast(pa.array([value]), dtype, safe=True)
    except _ARROW_ERRORS:
        return False
    return True


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return f"`{text}`" if len(text) <= 60 else f"`{text[:57]}...`"


def _json_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null"


def _describe_shape(document: Any, path: str) -> str:
    """Where the `records` path stops matching, and which keys are there (never values)."""
    current = document
    walked: list[str] = []
    for key in path.split(".") if path else []:
        if not isinstance(current, dict) or key not in current:
            break
        walked.append(key)
        current = current[key]
    where = f"`{'.'.join(walked)}`" if walked else "the response"
    if isinstance(current, dict):
        keys = list(current)
        shown = ", ".join(f"`{k}`" for k in keys[:_MAX_KEYS_SHOWN])
        more = " ..." if len(keys) > _MAX_KEYS_SHOWN else ""
        return f"{where} is an object with keys {shown or '(none)'}{more}"
    return f"{where} is {_json_kind(current)}"


def _connection_problem(exc: BaseException, destination: NetworkDestination) -> str:
    via = f"`{destination.destination}`"
    if isinstance(exc, socket.timeout | TimeoutError):
        return f"no answer from {via} in time (`timeout`)"
    if isinstance(exc, ConnectionRefusedError):
        return f"{via} refused the connection"
    if isinstance(exc, http.client.RemoteDisconnected | ConnectionResetError):
        return f"{via} closed the connection before answering"
    return f"cannot reach {via}: {exc.__class__.__name__}: {exc}"
