"""Which schema changes a run may bring to an Iceberg table.

Allowed, and applied in the same commit as the data (`union_by_name`): new columns (at any
depth), a column becoming nullable, and the widenings Iceberg defines: `int` -> `long`,
`float` -> `double`, `decimal(P,S)` -> `decimal(P',S)` with P' > P. Data narrower than the table
(an `int` column into a `long` one) is accepted as it is: Iceberg reads it as the wider type.
Anything else is refused before anything is written, naming the column and both types.
"""

from __future__ import annotations

import pyarrow as pa
from pyiceberg.io.pyarrow import _pyarrow_to_schema_without_ids
from pyiceberg.schema import Schema
from pyiceberg.types import (
    DecimalType,
    DoubleType,
    FloatType,
    IcebergType,
    IntegerType,
    ListType,
    LongType,
    MapType,
    StructType,
)

from dativo.lake._base import SchemaEvolutionError

__all__ = ["arrow_to_iceberg", "needs_evolution"]

_ALLOWED = (
    "Iceberg allows only new columns and the widenings int -> long, float -> double and "
    "decimal(P,S) -> decimal(P',S) with P' > P"
)


def arrow_to_iceberg(schema: pa.Schema) -> Schema:
    """The Iceberg schema of Arrow data (field ids not assigned)."""
    try:
        return _pyarrow_to_schema_without_ids(schema)
    except (ValueError, TypeError) as exc:
        raise SchemaEvolutionError(
            f"the data's schema cannot be stored in an Iceberg table: {exc}"
        ) from None


def needs_evolution(table_schema: Schema, data: pa.Schema, *, table: str) -> bool:
    """True when the table's schema must change to take `data`.

    Raises:
        SchemaEvolutionError: a change Iceberg does not allow; the message names the column.
    """
    incoming = arrow_to_iceberg(data)
    return _struct(table_schema.as_struct(), incoming.as_struct(), (), table)


def _widens(narrow: IcebergType, wide: IcebergType) -> bool:
    if isinstance(narrow, IntegerType) and isinstance(wide, LongType):
        return True
    if isinstance(narrow, FloatType) and isinstance(wide, DoubleType):
        return True
    return (
        isinstance(narrow, DecimalType)
        and isinstance(wide, DecimalType)
        and narrow.scale == wide.scale
        and wide.precision > narrow.precision
    )


def _refuse(path: tuple[str, ...], old: IcebergType, new: IcebergType, table: str) -> None:
    column = ".".join(path)
    raise SchemaEvolutionError(
        f"column `{column}` is `{old}` in Iceberg table `{table}` but `{new}` in this run's "
        f"data: an incompatible change, refused ({_ALLOWED}); nothing was committed. Cast the "
        "column back in the source, or load into a new table",
        field="target.iceberg",
    )


def _struct(old: StructType, new: StructType, path: tuple[str, ...], table: str) -> bool:
    change = False
    for field in new.fields:
        existing = old.field_by_name(field.name)
        if existing is None:
            change = True  # a new column
            continue
        if field.optional and existing.required:
            change = True
        change |= _type(existing.field_type, field.field_type, (*path, field.name), table)
    names = {field.name for field in new.fields}
    for field in old.fields:
        if field.required and field.name not in names:
            raise SchemaEvolutionError(
                f"column `{'.'.join((*path, field.name))}` is required in Iceberg table "
                f"`{table}` but missing from this run's data; nothing was committed",
                field="target.iceberg",
            )
    return change


def _type(old: IcebergType, new: IcebergType, path: tuple[str, ...], table: str) -> bool:
    if old == new:
        return False
    if old.is_primitive and new.is_primitive:
        if _widens(new, old):
            return False  # narrower data: read as the table's wider type
        if _widens(old, new):
            return True
        _refuse(path, old, new, table)
    if isinstance(old, StructType) and isinstance(new, StructType):
        return _struct(old, new, path, table)
    if isinstance(old, ListType) and isinstance(new, ListType):
        change = new.element_required is False and old.element_required
        return _type(old.element_type, new.element_type, (*path, "element"), table) or change
    if isinstance(old, MapType) and isinstance(new, MapType):
        key = _type(old.key_type, new.key_type, (*path, "key"), table)
        value = _type(old.value_type, new.value_type, (*path, "value"), table)
        return key or value or (new.value_required is False and old.value_required)
    _refuse(path, old, new, table)
    return False  # not reached
