"""The `generate` reader: deterministic synthetic data for demos, tests and benchmarks.

Every value is a pure function of (seed, column, row index): a SplitMix64 hash computed with
vectorised Arrow kernels, so any batch size yields the same rows and :func:`generate_table`
returns exactly what the reader streams.

Columns cycle through a fixed mix of types; column N is named `{kind}_N`, except column 0, the
unique, non-null `id`::

    0 id / int64_N    int64           (id = row index; later int64 columns are hashes)
    1 int32_N         int32
    2 float64_N       float64
    3 string_N        string          (5-30 letters, drawn from a pool of 4096 per seed)
    4 bool_N          bool
    5 timestamp_N     timestamp[us]   (2020-01-01 .. mid 2024, microsecond precision)
    6 date_N          date32          (2020-01-01 .. 2031)
    7 decimal_N       decimal128(12,2)

About 5% of the values of every column but `id` are null.

CSV round trip: :func:`generate_csv` writes the data with Arrow's CSV writer. Read back by the
`files` reader *with the declared schema* :func:`csv_schema` (a `schema:` mapping for the job
file), the table is exactly equal to :func:`generate_table`: floats are written in shortest
round-trip form, strings are always quoted (so an empty string and a null differ) and contain
only consonants (so no value looks like a number, a boolean or a null marker). Without a
declared schema, CSV type inference reads int32 columns as int64, timestamps as
timestamp[ns] and decimals as float64; every other column is inferred exactly.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from pydantic import BaseModel, ConfigDict, Field

from dativo.connectors import parse_plugin_config
from dativo.sdk import DataReader, PluginContext

__all__ = ["GenerateReader", "csv_schema", "generate_csv", "generate_schema", "generate_table"]

_U64 = pa.uint64()
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB

# The type mix, cycled by column index; column 0 is the id.
_KINDS: list[tuple[str, pa.DataType, str]] = [
    ("int64", pa.int64(), "int64"),
    ("int32", pa.int32(), "int32"),
    ("float64", pa.float64(), "float64"),
    ("string", pa.string(), "string"),
    ("bool", pa.bool_(), "bool"),
    ("timestamp", pa.timestamp("us"), "timestamp[us]"),
    ("date", pa.date32(), "date32"),
    ("decimal", pa.decimal128(12, 2), "decimal128(12,2)"),
]
_NULL_THRESHOLD = 13  # low byte of the hash below this -> null: 13/256 ~ 5.1%
_TS_BASE_US = 1_577_836_800_000_000  # 2020-01-01T00:00:00
_DATE_BASE = 18_262  # 2020-01-01 in days since the epoch
_POOL_BITS = 12
_POOL_SIZE = 1 << _POOL_BITS
# Consonants only: no generated string can read as a number, a boolean, NaN/inf or a null marker.
_ALPHABET = "bcdfghjklmnpqrstvwxzBCDFGHJKLMNPQRSTVWXZ"
_CHUNK = 65_536


class GenerateConfig(BaseModel):
    """Config of the `generate` reader."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rows: int = Field(ge=0, description="number of rows to produce")
    columns: int = Field(default=10, ge=1, le=1000, description="number of columns (1-1000)")
    seed: int = Field(default=0, description="seed; the same seed gives the same data")
    repeat_batch: bool = Field(
        default=False,
        description="build one batch and send it again and again (transport benchmarks)",
    )


def _splitmix(value: int) -> int:
    z = (value + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _u64(value: int) -> pa.Scalar:
    return pa.scalar(value & _MASK64, _U64)


def _column_name(index: int) -> str:
    return "id" if index == 0 else f"{_KINDS[index % len(_KINDS)][0]}_{index}"


def generate_schema(columns: int) -> pa.Schema:
    """The schema of `columns` generated columns."""
    fields = [pa.field("id", pa.int64())]
    fields += [pa.field(_column_name(i), _KINDS[i % len(_KINDS)][1]) for i in range(1, columns)]
    return pa.schema(fields)


def csv_schema(columns: int) -> dict[str, str]:
    """The `schema:` mapping (column -> type string) that reads generated CSV back exactly."""
    return {_column_name(i): _KINDS[i % len(_KINDS)][2] for i in range(columns)}


@functools.lru_cache(maxsize=8)
def _string_pool(seed: int) -> pa.Array:
    rng = random.Random(_splitmix(seed ^ 0x5EED))
    words = ["".join(rng.choices(_ALPHABET, k=rng.randint(5, 30))) for _ in range(_POOL_SIZE)]
    return pa.array(words, pa.string())


def _hash(index: pa.Array, key: int) -> pa.Array:
    """SplitMix64 of (row index * golden + key), vectorised; wraps modulo 2**64."""
    z = pc.add(pc.multiply(index, _u64(_GOLDEN)), _u64(key))
    z = pc.multiply(pc.bit_wise_xor(z, pc.shift_right(z, _u64(30))), _u64(_MIX1))
    z = pc.multiply(pc.bit_wise_xor(z, pc.shift_right(z, _u64(27))), _u64(_MIX2))
    return pc.bit_wise_xor(z, pc.shift_right(z, _u64(31)))


def _bits(h: pa.Array, shift: int) -> pa.Array:
    """The top `64 - shift` bits of the hash as int64."""
    return pc.cast(pc.shift_right(h, _u64(shift)), pa.int64())


def _column(kind: int, h: pa.Array, seed: int) -> pa.Array:
    if kind == 0:
        values = pc.subtract(_bits(h, 8), pa.scalar(1 << 55, pa.int64()))
    elif kind == 1:
        values = pc.cast(pc.subtract(_bits(h, 33), pa.scalar(1 << 30, pa.int64())), pa.int32())
    elif kind == 2:
        unit = pc.multiply(pc.cast(pc.shift_right(h, _u64(11)), pa.float64()), 2.0**-53)
        values = pc.subtract(pc.multiply(unit, 2e6), 1e6)
    elif kind == 3:
        values = pc.take(_string_pool(seed), _bits(h, 64 - _POOL_BITS))
    elif kind == 4:
        values = pc.equal(pc.shift_right(h, _u64(63)), _u64(1))
    elif kind == 5:
        micros = pc.add(_bits(h, 64 - 47), pa.scalar(_TS_BASE_US, pa.int64()))
        values = pc.cast(micros, pa.timestamp("us"))
    elif kind == 6:
        days = pc.add(_bits(h, 64 - 12), pa.scalar(_DATE_BASE, pa.int64()))
        values = pc.cast(pc.cast(days, pa.int32()), pa.date32())
    else:
        cents = pc.subtract(_bits(h, 64 - 36), pa.scalar(1 << 35, pa.int64()))
        # Same 16-byte layout: the unscaled integer (|cents| < 2**35, 11 digits) seen at scale 2.
        values = pc.cast(cents, pa.decimal128(19, 0)).view(pa.decimal128(12, 2))
    # Values come from the high bits, the null flag from the low byte.
    nulls = pc.less(pc.bit_wise_and(h, _u64(0xFF)), _u64(_NULL_THRESHOLD))
    return pc.if_else(nulls, pa.scalar(None, values.type), values)


def _make_batch(
    start: int, rows: int, columns: int, seed: int, schema: pa.Schema
) -> pa.RecordBatch:
    ids = pa.arange(start, start + rows)
    index = pc.cast(ids, _U64)
    arrays: list[pa.Array] = [ids]
    for c in range(1, columns):
        key = _splitmix((seed * 1_000_003 + c) & _MASK64)
        arrays.append(_column(c % len(_KINDS), _hash(index, key), seed))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _batches(rows: int, columns: int, seed: int, batch_size: int) -> Iterator[pa.RecordBatch]:
    schema = generate_schema(columns)
    for start in range(0, rows, batch_size):
        yield _make_batch(start, min(batch_size, rows - start), columns, seed, schema)


def generate_table(rows: int, columns: int = 10, seed: int = 0) -> pa.Table:
    """Exactly the rows the `generate` reader yields for this config (without repeat_batch)."""
    schema = generate_schema(columns)
    return pa.Table.from_batches(list(_batches(rows, columns, seed, _CHUNK)), schema=schema)


def generate_csv(path: str | Path, rows: int, columns: int = 10, seed: int = 0) -> None:
    """Write generated data as CSV with a header, streaming (memory stays bounded).

    Read it back with the `files` reader and `schema: csv_schema(columns)` for an exact copy of
    :func:`generate_table`; see the module docstring for what inference changes.
    """
    schema = generate_schema(columns)
    with pacsv.CSVWriter(str(path), schema) as writer:
        for batch in _batches(rows, columns, seed, _CHUNK):
            writer.write_batch(batch)


class GenerateReader(DataReader):
    """Deterministic synthetic rows; config keys `rows`, `columns`, `seed`, `repeat_batch`."""

    name = "generate"
    version = "0.1.0"

    def __init__(self) -> None:
        self._config: GenerateConfig | None = None

    def initialize(self, config: dict[str, Any], context: PluginContext) -> None:
        self._config = parse_plugin_config(GenerateConfig, config, "reader `generate`")

    def _cfg(self) -> GenerateConfig:
        if self._config is None:
            raise RuntimeError("initialize() was not called")
        return self._config

    def get_schema(self) -> pa.Schema:
        return generate_schema(self._cfg().columns)

    def read_batch(self, batch_size: int) -> Iterator[pa.RecordBatch]:
        cfg = self._cfg()
        size = max(1, batch_size)
        if not cfg.repeat_batch:
            yield from _batches(cfg.rows, cfg.columns, cfg.seed, size)
            return
        if cfg.rows == 0:
            return
        one = _make_batch(0, min(size, cfg.rows), cfg.columns, cfg.seed, self.get_schema())
        full, rest = divmod(cfg.rows, one.num_rows)
        for _ in range(full):
            yield one
        if rest:
            yield one.slice(0, rest)
