"""Job file loading and validation: good files, every kind of bad file, units, schema, CLI."""

from __future__ import annotations

import argparse
import copy
import math
import re
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from dativo.cli import _validate
from dativo.config import (
    BuiltinPlugin,
    ImagePlugin,
    JobConfig,
    JobConfigError,
    PluginSpec,
    PythonPlugin,
    format_duration,
    format_size,
    load_job,
    parse_duration,
    parse_job,
    parse_size,
)
from dativo.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
DIGEST = "sha256:" + "0123456789abcdef" * 4
DROP = object()

GOOD: dict[str, Any] = {
    "version": 1,
    "name": "quickstart",
    "source": {"files": "./data", "reader": {"type": "builtin", "name": "files"}},
    "target": {"path": "./warehouse/orders", "writer": {"type": "builtin", "name": "parquet"}},
}


def job(*changes: tuple[str, Any]) -> str:
    """GOOD as YAML text, with `(dotted.path, value)` changes applied (DROP deletes)."""
    data = copy.deepcopy(GOOD)
    for dotted, value in changes:
        *parents, last = dotted.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        if value is DROP:
            del node[last]
        else:
            node[last] = value
    return yaml.safe_dump(data, sort_keys=False)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8", "surrogateescape"))  # lone surrogates: raw bytes
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_job(path)
    assert not isinstance(info.value.__cause__, pydantic.ValidationError)
    return str(info.value)


# Each case: id, job file text, the field path named in the message, a fragment of the fix.
BAD_FIELDS: list[tuple[str, str, str, str]] = [
    ("missing-version", job(("version", DROP)), "version", "missing; required"),
    ("version-2", job(("version", 2)), "version", "version `1` only"),
    ("version-string", job(("version", "one")), "version", "expected the number `1`"),
    ("missing-name", job(("name", DROP)), "name", "missing; required"),
    ("bad-name", job(("name", "Quick Start!")), "name", "lowercase letters, digits, `_` or `-`"),
    ("name-too-long", job(("name", "a" * 64)), "name", "1 to 63"),
    ("unknown-top-key", job(("sources", {})), "sources", "did you mean `source`?"),
    (
        "unknown-nested-key",
        job(("source.reader.resouces", {"cpus": 2})),
        "source.reader.resouces",
        "did you mean `resources`?",
    ),
    (
        "unknown-writer-key",
        job(("target.writer.colour", "blue")),
        "target.writer.colour",
        "allowed keys here: `config`, `isolation`, `name`, `network`, `resources`, `type`",
    ),
    (
        "unknown-run-key",
        job(("run.batchsize", 10)),
        "run.batchsize",
        "did you mean `batch_size`?",
    ),
    ("missing-source", job(("source", DROP)), "source", "missing; required"),
    (
        "missing-reader",
        job(("source.reader", DROP)),
        "source.reader",
        "missing; required, such as `reader: {type: builtin, name: files}`",
    ),
    (
        "reader-not-a-mapping",
        job(("source.reader", "files")),
        "source.reader",
        "expected a mapping with `type`",
    ),
    (
        "reader-type-unknown",
        job(("source.reader.type", "docker")),
        "source.reader.type",
        "got `docker`; expected one of `builtin`, `image`, `python`",
    ),
    (
        "reader-type-missing",
        job(("source.reader.type", DROP)),
        "source.reader.type",
        "missing; required, one of `builtin`, `image`, `python`",
    ),
    (
        "writer-as-reader",
        job(("source.reader.name", "parquet")),
        "source.reader.name",
        "`parquet` is a built-in writer, not a reader; built-in readers: `files`, `generate`",
    ),
    (
        "reader-as-writer",
        job(("target.writer.name", "files")),
        "target.writer.name",
        "`files` is a built-in reader, not a writer",
    ),
    (
        "writer-unknown",
        job(("target.writer.name", "csv")),
        "target.writer.name",
        "built-in writers: `parquet`, `null`",
    ),
    (
        "null-writer-unquoted",
        job(("target.writer.name", None)),
        "target.writer.name",
        'write `name: "null"`',
    ),
    (
        "image-bad-digest",
        job(("source.reader", {"type": "image", "image": "myorg/pg@sha256:abc123"})),
        "source.reader.image",
        "`sha256:` followed by exactly 64 lowercase hex digits",
    ),
    (
        "image-uppercase",
        job(("source.reader", {"type": "image", "image": "myorg/PG:1.0"})),
        "source.reader.image",
        "repository names are lowercase",
    ),
    (
        "image-bad-id",
        job(("target.writer", {"type": "image", "image": "sha256:1234"})),
        "target.writer.image",
        "exactly 64 lowercase hex digits",
    ),
    (
        "python-missing-implementation",
        job(("source.reader", {"type": "python", "path": "./plugins"})),
        "source.reader.implementation",
        "missing; required",
    ),
    (
        "implementation-without-class",
        job(("source.reader", {"type": "python", "implementation": "my_plugins.orders"})),
        "source.reader.implementation",
        "expected `module.path:ClassName`",
    ),
    (
        "image-implementation-without-class",
        job(("target.writer", {"type": "image", "image": "w:1", "implementation": "a.b:"})),
        "target.writer.implementation",
        "`module.path:ClassName`",
    ),
    (
        "memory-lots",
        job(("source.reader.resources", {"memory": "lots"})),
        "source.reader.resources.memory",
        "got `lots`; expected a size such as `512MiB` or `2GiB`",
    ),
    (
        "memory-below-minimum",
        job(("source.reader.resources", {"memory": "8MiB"})),
        "source.reader.resources.memory",
        "from `16MiB` to `64GiB`",
    ),
    (
        "memory-unknown-unit",
        job(("source.reader.resources", {"memory": "2 parsecs"})),
        "source.reader.resources.memory",
        "expected a size",
    ),
    (
        "cpus-zero",
        job(("target.writer.resources", {"cpus": 0})),
        "target.writer.resources.cpus",
        "from 0.05 to 64 CPUs",
    ),
    (
        "cpus-negative",
        job(("target.writer.resources", {"cpus": -2})),
        "target.writer.resources.cpus",
        "got `-2`; expected a number from 0.05 to 64 CPUs",
    ),
    (
        "cpus-string",
        job(("target.writer.resources", {"cpus": "two"})),
        "target.writer.resources.cpus",
        "expected a number (without quotes)",
    ),
    (
        "pids-too-large",
        job(("source.reader.resources", {"pids": 100_000})),
        "source.reader.resources.pids",
        "from 8 to 4,096 processes",
    ),
    (
        "timeout-forever",
        job(("source.reader.resources", {"timeout": "forever"})),
        "source.reader.resources.timeout",
        "expected a duration such as `30s`",
    ),
    (
        "timeout-zero",
        job(("source.reader.resources", {"timeout": 0})),
        "source.reader.resources.timeout",
        "from `1s` to `7d`",
    ),
    (
        "tmpfs-too-big",
        job(("source.reader.resources", {"tmpfs": "32GiB"})),
        "source.reader.resources.tmpfs",
        "from `1MiB` to `16GiB`",
    ),
    (
        "user-root",
        job(("source.reader.isolation", {"user": "0:0"})),
        "source.reader.isolation.user",
        "plugins never run as root",
    ),
    (
        "user-root-group",
        job(("source.reader.isolation", {"user": "1000:0"})),
        "source.reader.isolation.user",
        "uid 0 and gid 0 are refused",
    ),
    (
        "user-not-uid-gid",
        job(("source.reader.isolation", {"user": "nobody"})),
        "source.reader.isolation.user",
        "expected numeric `UID:GID`",
    ),
    (
        "user-base-60",
        "version: 1\nname: a\nsource: {reader: {type: builtin, name: files,"
        " isolation: {user: 1000:50}}}\ntarget: {writer: {type: builtin, name: parquet}}\n",
        "source.reader.isolation.user",
        'quoted `UID:GID` string such as `"65534:65534"`',
    ),
    (
        "runtime-unknown",
        job(("target.writer.isolation", {"runtime": "kata"})),
        "target.writer.isolation.runtime",
        "expected one of `runc`, `runsc`",
    ),
    ("batch-size-zero", job(("run", {"batch_size": 0})), "run.batch_size", "from 1 to 10,000,000"),
    (
        "batch-size-fraction",
        job(("run", {"batch_size": 2.5})),
        "run.batch_size",
        "expected a whole number",
    ),
    (
        "max-frame-too-big",
        job(("run", {"max_frame_bytes": "3GiB"})),
        "run.max_frame_bytes",
        "from `1MiB` to `2GiB`",
    ),
    (
        "handshake-garbage",
        job(("run", {"handshake_timeout": "soonish"})),
        "run.handshake_timeout",
        "from `1s` to `10m`",
    ),
    (
        "config-a-list",
        job(("source.reader.config", ["a", "b"])),
        "source.reader.config",
        "got a list; expected a mapping of plugin settings",
    ),
    (
        "files-empty",
        job(("source.files", "")),
        "source.files",
        "an empty string is not a path",
    ),
    (
        "python-path-not-a-string",
        job(("source.reader", {"type": "python", "implementation": "a:B", "path": 3})),
        "source.reader.path",
        "expected a path such as `./data`",
    ),
    ("state-not-a-mapping", job(("state", "x.db")), "state", "expected a mapping with keys"),
]


@pytest.mark.parametrize(
    ("text", "field", "fix"),
    [pytest.param(text, field, fix, id=case) for case, text, field, fix in BAD_FIELDS],
)
def test_bad_field_is_reported_with_path_and_fix(
    tmp_path: Path, request: pytest.FixtureRequest, text: str, field: str, fix: str
) -> None:
    name = f"{request.node.callspec.id}.yaml"
    message = error_of(write(tmp_path, name, text))
    assert message.startswith(f"{tmp_path / name}: 1 problem\n"), message
    assert f"  - `{field}`: " in message, message
    assert fix in message, message


BAD_FILES: list[tuple[str, str, str]] = [
    (
        "yaml-syntax",
        "version: 1\nname: a\nsource:\n  reader: {type: builtin\ntarget: x\n",
        "YAML syntax error at line 5",
    ),
    ("yaml-bad-indent", "version: 1\n name: a\n", "YAML syntax error at line 2"),
    ("duplicate-key", "version: 1\nname: a\nname: b\n", "key `name` is given twice"),
    ("empty", "", "the file is empty"),
    ("only-comments", "# nothing here\n", "the file is empty"),
    ("top-level-list", "- version: 1\n", "the top level is a list; expected a mapping"),
    ("top-level-string", "hello\n", "the top level is `hello`; expected a mapping"),
    ("two-documents", "version: 1\n---\nversion: 1\n", "line 2"),
    ("control-character", "version: 1\nname: \x01\n", "not valid YAML: special characters"),
    ("not-utf8", "version: 1\nname: caf\udce9\n", "not UTF-8 text"),
]


@pytest.mark.parametrize(
    ("text", "fix"), [pytest.param(text, fix, id=case) for case, text, fix in BAD_FILES]
)
def test_bad_file_is_reported(
    tmp_path: Path, request: pytest.FixtureRequest, text: str, fix: str
) -> None:
    name = f"{request.node.callspec.id}.yaml"
    message = error_of(write(tmp_path, name, text))
    assert message.startswith(f"{tmp_path / name}: "), message
    assert fix in message, message
    assert "\n" not in message


def test_file_not_found_names_the_file_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_job("jobs/missing.yaml")
    assert str(info.value) == "jobs/missing.yaml: file not found"
    assert info.value.source == "jobs/missing.yaml"


def test_directory_is_not_a_job_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_job(tmp_path)


def test_every_problem_is_reported_in_file_order(tmp_path: Path) -> None:
    text = job(
        ("target.writer.colour", "blue"),
        ("source.reader.resources", {"memory": "lots"}),
    )
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(JobConfigError) as info:
        load_job(path)
    assert str(info.value) == (
        f"{path}: 2 problems\n"
        "  - `source.reader.resources.memory`: got `lots`; expected a size such as `512MiB` or "
        "`2GiB`, from `16MiB` to `64GiB`\n"
        "  - `target.writer.colour`: unknown key; allowed keys here: `config`, `isolation`, "
        "`name`, `network`, `resources`, `type` (the plugin's own settings go under `config`)"
    )
    assert [p.field for p in info.value.problems] == [
        "source.reader.resources.memory",
        "target.writer.colour",
    ]
    assert info.value.field == "source.reader.resources.memory"


def test_other_version_reports_only_the_version(tmp_path: Path) -> None:
    path = write(tmp_path, "v2.yaml", "version: 2\nsinks: []\n")
    message = error_of(path)
    assert message.endswith(
        "1 problem\n  - `version`: got `2`; this Dativo reads job file "
        "version `1` only (write `version: 1`)"
    )


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(job(("target.writer.password", "hunter2-s3cr3t")), id="unknown-key"),
        pytest.param(
            job(("target.writer.isolation", {"api_key": "hunter2-s3cr3t"})), id="nested-key"
        ),
        pytest.param(
            job(("source.reader.config", {"password": "x"})) + 'oops: "hunter2-s3cr3t\n',
            id="yaml-error-on-secret-line",
        ),
        pytest.param(job(("source.reader.config", ["token", "hunter2-s3cr3t"])), id="list"),
        pytest.param(job(("name", {"secret": "hunter2-s3cr3t"})), id="mapping"),
    ],
)
def test_secret_values_never_appear(tmp_path: Path, text: str) -> None:
    message = error_of(write(tmp_path, "secret.yaml", text))
    assert "hunter2" not in message
    assert "s3cr3t" not in message


def test_long_values_are_truncated(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "long.yaml", job(("name", "x" * 500))))
    assert "x" * 59 + "\u2026" in message
    assert "x" * 61 not in message


# --------------------------------------------------------------------------------------------
# Good files


def test_minimal_job_gets_every_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "job.yaml",
        "version: 1\nname: quickstart\nsource:\n  reader: {type: builtin, name: generate}\n"
        'target:\n  writer: {type: builtin, name: "null"}\n',
    )
    config = load_job(path)
    assert config.job_path == path
    assert config.base_dir == tmp_path
    assert config.source.files is None
    assert config.source_files_dir is None
    assert config.target_dir is None
    assert config.state_path == (tmp_path / ".dativo" / "state.db").resolve()
    assert config.run.batch_size == 65536
    assert config.run.max_frame_bytes == 128 * 1024**2
    assert config.run.handshake_timeout == 30.0
    reader = config.source.reader
    assert isinstance(reader, BuiltinPlugin)
    assert reader.name == "generate"
    assert reader.config == {}
    assert reader.resources.cpus == 1.0
    assert reader.resources.memory == 1024**3
    assert reader.resources.pids == 128
    assert reader.resources.timeout == 3600.0
    assert reader.resources.tmpfs == 64 * 1024**2
    assert reader.isolation.runtime == "runc"
    assert reader.isolation.user == "65534:65534"
    assert (reader.isolation.uid, reader.isolation.gid) == (65534, 65534)
    assert config.target.writer.display_name == "builtin:null"


def test_full_job_parses_units_and_resolves_paths(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    path = write(
        jobs,
        "orders.yaml",
        f"""\
version: 1
name: orders-daily
source:
  files: ../data
  reader:
    type: python
    implementation: my_plugins.orders:OrdersReader
    path: plugins
    config: {{table: orders, password: "${{PGPASS}}", nested: {{a: [1, 2]}}}}
    resources: {{cpus: 0.5, memory: 512m, pids: 64, timeout: 1h30m, tmpfs: 100MB}}
    isolation: {{runtime: runsc, user: "1000:1000"}}
target:
  path: /srv/warehouse/orders
  writer:
    type: image
    image: ghcr.io/myorg/pg-writer@{DIGEST}
    implementation: pg_writer.plugin:PostgresWriter
    resources: {{memory: 2GiB, timeout: 90s}}
state:
  path: ~/state/orders.db
run:
  batch_size: 1000
  max_frame_bytes: 1MiB
  handshake_timeout: 2m
""",
    )
    config = load_job(path)
    reader, writer = config.source.reader, config.target.writer
    assert isinstance(reader, PythonPlugin)
    assert isinstance(writer, ImagePlugin)
    assert reader.config == {"table": "orders", "password": "${PGPASS}", "nested": {"a": [1, 2]}}
    assert reader.resources.memory == 512 * 1024**2
    assert reader.resources.timeout == 5400.0
    assert reader.resources.tmpfs == 100_000_000
    assert reader.resources.cpus == 0.5
    assert reader.isolation.runtime == "runsc"
    assert writer.resources.memory == 2 * 1024**3
    assert writer.resources.timeout == 90.0
    assert config.source_files_dir == (tmp_path / "data").resolve()
    assert config.python_plugin_dir(reader) == (jobs / "plugins").resolve()
    assert config.python_plugin_dir(writer) is None
    assert config.target_dir == Path("/srv/warehouse/orders")
    assert config.state_path == (Path.home() / "state" / "orders.db").resolve()
    assert config.run.max_frame_bytes == 1024**2
    assert config.run.handshake_timeout == 120.0
    assert reader.display_name == "python:my_plugins.orders:OrdersReader"
    assert writer.display_name == "image:ghcr.io/myorg/pg-writer@sha256:0123456789ab\u2026"


def test_timeout_below_a_second_is_refused(tmp_path: Path) -> None:
    text = job(("target.writer.resources", {"timeout": "500ms"}))
    message = error_of(write(tmp_path, "fast.yaml", text))
    assert "`target.writer.resources.timeout`: got `500ms`" in message


@pytest.mark.parametrize(
    ("image", "shown"),
    [
        ("myorg/reader", "image:myorg/reader"),
        ("myorg/reader:1.2.3", "image:myorg/reader:1.2.3"),
        ("localhost:5000/team/reader:latest", "image:localhost:5000/team/reader:latest"),
        (f"myorg/pg@{DIGEST}", "image:myorg/pg@sha256:0123456789ab\u2026"),
        (f"myorg/pg:1.0@{DIGEST}", "image:myorg/pg:1.0@sha256:0123456789ab\u2026"),
        (DIGEST, "image:sha256:0123456789ab\u2026"),
    ],
)
def test_image_references(image: str, shown: str) -> None:
    data = copy.deepcopy(GOOD)
    data["source"]["reader"] = {"type": "image", "image": image}
    assert parse_job(data).source.reader.display_name == shown


def test_parse_job_resolves_against_cwd_or_base_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = parse_job(GOOD)
    assert config.job_path is None
    assert config.base_dir == tmp_path
    assert config.source_files_dir == (tmp_path / "data").resolve()
    other = parse_job(GOOD, base_dir=tmp_path / "elsewhere")
    assert other.target_dir == (tmp_path / "elsewhere" / "warehouse" / "orders").resolve()


def test_parse_job_names_its_source() -> None:
    with pytest.raises(ConfigError, match=r"^inline: 1 problem\n  - `name`: missing"):
        parse_job({k: v for k, v in GOOD.items() if k != "name"}, source="inline")


def test_config_is_frozen() -> None:
    config = parse_job(GOOD)
    with pytest.raises(pydantic.ValidationError):
        config.name = "other"  # type: ignore[misc]


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "merge.yaml",
        "version: 1\nname: m\nsource:\n  reader:\n    type: builtin\n    name: files\n"
        "    resources: &limits {memory: 2GiB, cpus: 2}\n"
        "target:\n  writer:\n    type: builtin\n    name: parquet\n"
        "    resources: {<<: *limits, cpus: 4}\n",
    )
    config = load_job(path)
    assert config.target.writer.resources.memory == 2 * 1024**3
    assert config.target.writer.resources.cpus == 4


# --------------------------------------------------------------------------------------------
# Units


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (1048576, 1048576),
        (2048.0, 2048),
        ("1024", 1024),
        ("512B", 512),
        ("64KiB", 64 * 1024),
        ("512MiB", 512 * 1024**2),
        ("2GiB", 2 * 1024**3),
        ("1TiB", 1024**4),
        ("1.5GiB", 3 * 512 * 1024**2),
        ("100MB", 100_000_000),
        ("1kb", 1000),
        ("512m", 512 * 1024**2),
        ("1g", 1024**3),
        (" 16 MiB ", 16 * 1024**2),
        ("2gib", 2 * 1024**3),
    ],
)
def test_parse_size(value: object, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize(
    "value", ["lots", "", "MiB", "-1MiB", "1 2MiB", "5 parsecs", "1.5.2GiB", -1, 1.5, True, None]
)
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (30, 30.0),
        (0.25, 0.25),
        ("45", 45.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1h 30m 15s", 5415.0),
        ("500ms", 0.5),
        ("2d", 172800.0),
        ("1.5h", 5400.0),
    ],
)
def test_parse_duration(value: object, expected: float) -> None:
    assert parse_duration(value) == expected


@pytest.mark.parametrize(
    "value", ["forever", "", "1x", "h", "-5s", "1h30", "1 h 30", -1, math.inf, False, None, [1]]
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0B"), (512, "512B"), (64 * 1024, "64KiB"), (1024**3, "1GiB"), (1536 * 1024**2, "1.5GiB")],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text
    assert parse_size(text) == n


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.5, "500ms"), (30, "30s"), (5400, "1h30m"), (7 * 86400, "7d"), (90.5, "90.5s")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


# --------------------------------------------------------------------------------------------
# Schema, docs and CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dativo")
    _validate.register(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(*argv: str) -> int:
    args = _parser().parse_args(argv)
    status: int = args.func(args)
    return status


def test_committed_schema_is_current() -> None:
    committed = (REPO / "docs" / "job.schema.json").read_text(encoding="utf-8")
    assert committed == _validate.schema_text(), "run `dativo schema -o docs/job.schema.json`"


def test_schema_describes_every_field() -> None:
    schema = JobConfig.model_json_schema()
    for name, definition in schema["$defs"].items():
        for field, spec in definition["properties"].items():
            assert spec.get("description"), f"{name}.{field} has no description"


def test_configuration_doc_mentions_every_field() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    schema = JobConfig.model_json_schema()
    names = set(schema["properties"])
    for definition in schema["$defs"].values():
        names |= set(definition["properties"])
    missing = sorted(name for name in names if f"`{name}`" not in doc)
    assert not missing, f"docs/configuration.md does not mention {missing}"


def test_cli_schema_writes_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "schema.json"
    assert _run("schema", "--output", str(out)) == 0
    assert out.read_text(encoding="utf-8") == _validate.schema_text()
    assert _run("schema") == 0
    assert capsys.readouterr().out == _validate.schema_text()


def test_cli_schema_unwritable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot write the schema"):
        _run("schema", "--output", str(tmp_path / "no" / "such" / "dir" / "s.json"))


def test_cli_validate_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "job.yaml", job())
    assert _run("validate", str(path)) == 0
    assert capsys.readouterr().out == (
        f"ok: {path} (reader builtin:files -> writer builtin:parquet)\n"
    )


def test_cli_validate_reports_every_bad_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write(tmp_path, "good.yaml", job())
    bad = write(tmp_path, "bad.yaml", job(("run", {"batch_size": 0})))
    with pytest.raises(ConfigError) as info:
        _run("validate", str(bad), str(good), str(tmp_path / "gone.yaml"))
    assert f"ok: {good}" in capsys.readouterr().out
    message = str(info.value)
    assert f"{bad}: 1 problem\n  - `run.batch_size`: got `0`" in message
    assert f"{tmp_path / 'gone.yaml'}: file not found" in message


def test_configuration_doc_examples_are_valid() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", doc, flags=re.DOTALL)
    jobs = [block for block in blocks if block.startswith("version: 1")]
    assert len(jobs) >= 2
    for block in jobs:
        parse_job(yaml.safe_load(block), source="docs/configuration.md")


def test_plugin_spec_type_accepts_any_builtin() -> None:
    adapter: pydantic.TypeAdapter[PluginSpec] = pydantic.TypeAdapter(PluginSpec)
    spec = adapter.validate_python({"type": "builtin", "name": "null"})
    assert isinstance(spec, BuiltinPlugin)
    assert spec.display_name == "builtin:null"
    with pytest.raises(pydantic.ValidationError, match="built-in readers: `files`, `generate`"):
        adapter.validate_python({"type": "builtin", "name": "csv"})
