"""The manifest model, canonical JSON, strict JSON and semantic versions."""

from __future__ import annotations

import json

import pytest

from dativo.connectors import BUILTINS
from dativo.signing import (
    Manifest,
    ManifestError,
    Version,
    builtin_manifest,
    canonical_json,
    manifest_digest,
    parse_manifest,
)
from dativo.signing._manifest import loads_strict
from tests.unit.signing.conftest import manifest


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert canonical_json({"b": [1, "é"], "a": {"y": 1, "x": None}}) == (
        '{"a":{"x":null,"y":1},"b":[1,"é"]}'.encode()
    )
    assert manifest_digest({"a": 1}) == manifest_digest(json.loads('{ "a" : 1 }'))
    with pytest.raises(ValueError, match="Out of range float"):
        canonical_json({"x": float("nan")})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"a": 1, "a": 2}', "the key `a` appears twice"),
        ('{"a": NaN}', "`NaN` is not JSON"),
        ("{", "not JSON"),
        (b"\xff", "not UTF-8"),
    ],
)
def test_strict_json_refuses_what_hides_the_signed_value(text: str | bytes, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        loads_strict(text)


@pytest.mark.parametrize(
    "ordered",
    [
        [
            "1.0.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-alpha.beta",
            "1.0.0-beta",
            "1.0.0-beta.2",
            "1.0.0-beta.11",
            "1.0.0-rc.1",
            "1.0.0",
            "1.0.1",
            "1.2.0",
            "1.10.0",
            "2.0.0",
        ],
    ],
)
def test_versions_follow_semver_precedence(ordered: list[str]) -> None:
    versions = [Version(v) for v in ordered]
    assert sorted(reversed(versions)) == versions
    assert Version("1.0.0+build.5") == Version("1.0.0")
    assert Version("1.10.0") > Version("1.9.9")  # not string order


@pytest.mark.parametrize("text", ["1.0", "01.0.0", "1.0.0-", "v1.0.0", "1.0.0-01"])
def test_bad_versions(text: str) -> None:
    with pytest.raises(ValueError, match="not a semantic version"):
        Version(text)


def test_a_valid_manifest_parses_units() -> None:
    parsed = parse_manifest(manifest())
    assert isinstance(parsed, Manifest)
    assert parsed.resources.default.memory == 512 << 20
    assert parsed.resources.max.timeout == 3600
    assert parsed.semver == Version("1.0.0")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": "Acme/Gen"}, "`name`: expected `publisher/plugin`"),
        ({"name": "gen"}, "`name`: expected `publisher/plugin`"),
        ({"version": "1.0"}, "`version`: `1.0` is not a semantic version"),
        ({"kind": "transformer"}, "`kind`"),
        ({"protocol": 2}, "`protocol`"),
        ({"entrypoint": []}, "`entrypoint`"),
        ({"network": ["db"]}, "`network[0]`: expected `host:port`"),
        ({"network": ["DB:5432"]}, "write the destination as `db:5432`"),
        ({"network": ["*:http"]}, "port is a number or `*`"),
        ({"network": ["db.*.com:5432"]}, "only `*` or a leading `*.`"),
        ({"network": ["*.Example.com:443"]}, "write the host in lower case"),
        ({"secrets": ["a b"]}, "`secrets[0]`"),
        ({"colour": "red"}, "`colour`: unknown field"),
        (
            {
                "resources": {
                    "default": {"cpus": 4, "memory": "1GiB", "pids": 8, "timeout": 1},
                    "max": {"cpus": 2, "memory": "1GiB", "pids": 8, "timeout": 1},
                }
            },
            "`default.cpus` is above `max.cpus`",
        ),
        ({"resources": {"default": {}, "max": {}}}, "`resources.default.cpus`: Field required"),
    ],
)
def test_invalid_manifests_say_which_field(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(manifest(**changes))
    assert message in str(caught.value)


def test_a_manifest_is_an_object() -> None:
    with pytest.raises(ManifestError, match="a manifest is a JSON object"):
        parse_manifest(["acme/gen"])


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_manifests_are_valid(name: str) -> None:
    data = builtin_manifest(name, "0.1.0")
    parsed = parse_manifest(data)
    assert parsed.name == f"dativo/{name}"
    assert parsed.kind == BUILTINS[name][0]
    assert parsed.entrypoint[-1] == BUILTINS[name][1]
    # Connectors to a network reach what the job grants; the others are declared offline.
    assert parsed.network == (("*:*",) if name in ("postgres", "http") else ())
    assert parsed.config_schema["type"] == "object"


@pytest.mark.parametrize(
    ("declared", "destination", "allowed"),
    [
        (("db.example.com:5432",), "db.example.com:5432", True),
        (("db.example.com:5432",), "db.example.com:5433", False),
        (("*:5432",), "10.0.0.7:5432", True),
        (("*:5432",), "db.example.com:6432", False),
        (("*:*",), "[2001:db8::1]:443", True),
        (("*.example.com:443",), "api.example.com:443", True),
        (("*.example.com:443",), "example.com:443", False),
        (("*.example.com:443",), "api.example.com.evil.net:443", False),
        (("db.example.com:*",), "db.example.com:15432", True),
        ((), "db.example.com:5432", False),
    ],
)
def test_network_patterns(declared: tuple[str, ...], destination: str, allowed: bool) -> None:
    from dativo.signing._manifest import network_allows

    assert parse_manifest(manifest(network=list(declared))).network == declared
    assert network_allows(declared, destination) is allowed
