"""A raw reader forging protocol frames and Arrow IPC bytes (tests/fixtures/images/wire): the
supervisor must refuse each with a clear plugin error, never crash, and never allocate what
the bytes declare. Run with the default limits, except the idle limit (3 s instead of 5 min,
for `stall-mid-frame`) and `run.max_rows` for the row-amplification case.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dativo.config import parse_job
from dativo.supervisor import run_job
from tests.security._attack import attack, expect, image_plugin
from tests.security.conftest import peak_rss_mib

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures" / "images" / "wire"))
import wire  # the fixture's own list of cases

pytestmark = [pytest.mark.security, pytest.mark.docker]

# mode -> (rule, a fragment of the message)
EXPECTED: dict[str, tuple[str, str]] = {
    # The 8-byte frame header and the frame as a whole.
    "frame-length-4GiB": ("protocol", "Arrow frame of 4294967295 bytes exceeds the limit of"),
    "frame-just-over-limit": ("protocol", "exceeds the limit of 134217728 bytes"),
    "frame-at-limit-then-close": ("crash", "closed the connection before `end`"),
    "control-over-1MiB": ("protocol", "control frame of 1048577 bytes exceeds the 1 MiB limit"),
    "unknown-frame-kind": ("protocol", "unknown frame kind 9"),
    "reserved-bytes-set": ("protocol", "frame header reserved bytes are not zero"),
    "truncated-frame-then-segfault": ("crash", "the plugin was killed (SIGSEGV, exit 139)"),
    "stall-mid-frame": ("timeout", "sent nothing for 3 s (the idle limit)"),
    # Malformed IPC messages inside well-formed frames.
    "not-arrow-ipc": ("arrow", "does not start with the 0xFFFFFFFF marker"),
    "legacy-format-without-marker": ("arrow", "does not start with the 0xFFFFFFFF marker"),
    "end-of-stream-marker": ("arrow", "end-of-stream marker inside an Arrow frame"),
    "metadata-length-2GiB": ("arrow", "IPC metadata declares 2147483640 bytes but the frame"),
    "metadata-length-unaligned": ("arrow", "is not a multiple of 8"),
    "flatbuffer-root-offset-outside": ("arrow", "lies outside the metadata"),
    "flatbuffer-vtable-outside": ("arrow", "lies outside the metadata"),
    "flatbuffer-random-metadata": ("arrow", "sent malformed Arrow IPC: flatbuffer"),
    "flatbuffer-schema-offsets-outside": ("arrow", "lies outside the metadata"),
    "metadata-version-v1": ("arrow", "IPC metadata version 0 is not supported"),
    "tensor-message": ("arrow", "IPC message type Tensor is not allowed"),
    "body-length-2^62": ("arrow", "declares a body of 4611686018427387904 bytes"),
    "body-length-negative": ("arrow", "IPC body length -8 is negative"),
    "truncated-body": ("arrow", "declares a body of 1904 bytes but the frame holds 1840"),
    "two-messages-in-one-frame": ("arrow", "declares a body of 64 bytes but the frame holds"),
    "buffer-offset-outside-body": ("arrow", "lies outside its body of 64 bytes"),
    "buffer-length-1TiB": ("arrow", "length 1099511627776) lies outside its body"),
    "row-count-2^40": ("arrow", "declares 1099511627776 rows; the limit is 67108864"),
    "row-count-lie": ("schema", "Array length did not match record batch length"),
    "compressed-buffers-claiming-1TiB": ("arrow", "uses IPC body compression, which protocol"),
    "dictionary-batch": ("arrow", "dictionary batches are not allowed in protocol v1"),
    "delta-dictionary-batch": ("arrow", "dictionary batches are not allowed in protocol v1"),
    "dictionary-in-schema": ("schema", "column `name` is dictionary-encoded"),
    "dictionary-nested-in-list": ("schema", "column `tags` is dictionary-encoded"),
    "variadic-buffer-count-2^31": ("schema", "variadic buffer count exceeds available number"),
    "schema-too-wide": ("arrow", "schema declares more than 10000 fields"),
    "schema-too-deep": ("arrow", "schema nests types more than 64 levels deep"),
    "schema-dag": ("arrow", "schema declares more than 10000 fields"),
    "schema-without-columns": ("schema", "declared a schema with no columns"),
    "record-batch-before-schema": ("protocol", "sent a record batch before its schema"),
    "second-schema": ("schema", "sent a second schema in the same stream"),
    # Schema lies: well-formed IPC contradicting the declared schema.
    "extra-column": ("schema", "with 3 field nodes where its declared schema has 2"),
    "missing-column": ("schema", "with 1 field nodes where its declared schema has 2"),
    "narrower-type": ("schema", "column `id` (declared int64): Invalid: Buffer #1 too small"),
    "type-change-mid-stream": ("schema", "column `id` (declared int64): Invalid"),
    "invalid-utf8": ("schema", "column `name` (declared string): Invalid: Invalid UTF8"),
    "string-offset-out-of-range": ("schema", "column `name` (declared string): Invalid: Offset"),
    "string-offsets-decreasing": ("schema", "non-monotonic offset at slot 1"),
    "null-count-lie": ("schema", "column `id` (declared int64): Invalid: Buffer #0 too small"),
    "null-rows-amplification": ("limit", "sent more than the 100,000,000 rows `run.max_rows`"),
    # Control messages.
    "json-nesting-bomb": ("protocol", "control frame nests JSON arrays or objects too deeply"),
    "json-integer-of-100k-digits": ("protocol", "Exceeds the limit (4300 digits)"),
    "control-not-json": ("protocol", "control frame is not UTF-8 JSON"),
    "unknown-message": ("protocol", "invalid control message (type `exec`)"),
    "hello-mid-stream": ("protocol", "sent `hello` during the stream"),
    "state-nested-100-deep": ("protocol", "control message nests more than 64 levels deep"),
    "state-of-1MiB": ("protocol", "sent a final state that could not be given back to it"),
}
# Not contained at the wire level, by nature: tested below as a documented limitation.
UNDETECTABLE = {"float-bits-as-int64"}


def test_every_case_of_the_fixture_is_expected() -> None:
    assert set(wire.CASES) == set(EXPECTED) | UNDETECTABLE


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_forged_bytes_are_refused(fixture_images: dict[str, str], workdir: Path, mode: str) -> None:
    rule, fragment = EXPECTED[mode]
    run: dict[str, object] = {"idle_timeout": "3s"}
    if mode == "null-rows-amplification":
        run["max_rows"] = 100_000_000
    tag = fixture_images["wire"]
    outcome = attack(workdir, image_plugin(tag, {"mode": mode}), run=run)
    expect(outcome, "reader", rule, f"reader plugin `image:{tag}`: ", fragment)
    # Whatever the bytes declared (2 GiB frames, 2^62-byte bodies, a million columns, 1 TiB
    # buffers), the supervisor never allocated it: this process stays far below.
    assert peak_rss_mib() < 1024, f"peak RSS {peak_rss_mib():.0f} MiB"


def test_same_layout_type_lie_passes_validation(
    fixture_images: dict[str, str], workdir: Path
) -> None:
    """float64 values sent where int64 was declared have the same buffers: nothing at the wire
    can tell them apart, so the batch passes and the writer receives int64 values holding the
    floats' bits. Documented in docs/security.md and docs/protocol.md; types stay sound."""
    job = parse_job(
        {
            "version": 1,
            "name": "same-layout",
            "source": {
                "reader": image_plugin(fixture_images["wire"], {"mode": "float-bits-as-int64"})
            },
            "target": {"writer": {"type": "builtin", "name": "null"}},
        },
        base_dir=workdir,
    )
    report = run_job(job)
    assert (report.status, report.rows) == ("succeeded", 3)
