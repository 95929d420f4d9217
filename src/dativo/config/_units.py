"""Parsers and formatters for the sizes and durations written in job files."""

from __future__ import annotations

import math
import re
from fractions import Fraction

__all__ = [
    "DURATION_PATTERN",
    "SIZE_PATTERN",
    "format_duration",
    "format_size",
    "parse_duration",
    "parse_size",
]

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

# Lower-cased unit -> bytes. `KiB`/`MiB`/... are binary, `KB`/`MB`/... decimal, and the single
# letters `k`/`m`/`g`/`t` follow Docker (`--memory 512m`), which means binary.
_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": KiB,
    "m": MiB,
    "g": GiB,
    "t": TiB,
    "kib": KiB,
    "mib": MiB,
    "gib": GiB,
    "tib": TiB,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")

#: JSON Schema pattern of a size string (documentation only; the parser is authoritative).
SIZE_PATTERN = r"^\s*\d+(\.\d+)?\s*([bBkKmMgGtT]|[kKmMgGtT][iI]?[bB])?\s*$"

_DURATION_UNITS: dict[str, float] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)"
_DURATION_RE = re.compile(rf"(?:{_DURATION_PART}\s*)+")
_DURATION_PART_RE = re.compile(_DURATION_PART)
_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?")

#: JSON Schema pattern of a duration string (documentation only; the parser is authoritative).
DURATION_PATTERN = r"^\s*(\d+(\.\d+)?|(\d+(\.\d+)?\s*(ms|s|m|h|d)\s*)+)\s*$"

SIZE_HINT = "a size such as `512MiB` or `2GiB`"
DURATION_HINT = "a duration such as `30s`, `5m`, `1h30m` or `2d`"


def parse_size(value: object) -> int:
    """Parse a size into bytes.

    Accepts a whole number of bytes (`1048576`) or a string with a unit: binary `KiB`, `MiB`,
    `GiB`, `TiB`; decimal `KB`, `MB`, `GB`, `TB`; Docker-style single letters `k`, `m`, `g`,
    `t` (binary, so `512m` is 512 MiB); `B` or no unit for bytes. Units are case-insensitive
    and a fractional number is allowed (`1.5GiB`); the result is rounded to whole bytes.

    Raises:
        ValueError: the value is not a size; the message says what a size looks like.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected {SIZE_HINT}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative; expected {SIZE_HINT}")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0 or not value.is_integer():
            raise ValueError(f"expected a whole number of bytes or {SIZE_HINT}")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"expected {SIZE_HINT}")
    match = _SIZE_RE.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"expected {SIZE_HINT}")
    number, unit = match.groups()
    multiplier = _SIZE_UNITS.get(unit.lower())
    if multiplier is None:
        raise ValueError(
            f"unknown unit `{unit[:12]}` (units: `B`, binary `KiB` `MiB` `GiB` `TiB`, decimal "
            f"`KB` `MB` `GB` `TB`, Docker-style `k` `m` `g` `t`); expected {SIZE_HINT}"
        )
    return round(Fraction(number) * multiplier)


def parse_duration(value: object) -> float:
    """Parse a duration into seconds.

    Accepts a number of seconds (`30`, `0.5`) or a string of one or more `<number><unit>`
    parts with units `ms`, `s`, `m`, `h`, `d` (`500ms`, `30s`, `5m`, `1h30m`, `2d`). A string
    holding just a number means seconds.

    Raises:
        ValueError: the value is not a duration; the message says what a duration looks like.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected {DURATION_HINT}")
    if isinstance(value, int | float):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise ValueError(f"expected a finite number of seconds or {DURATION_HINT}")
        if seconds < 0:
            raise ValueError(f"a duration cannot be negative; expected {DURATION_HINT}")
        return seconds
    if not isinstance(value, str):
        raise ValueError(f"expected {DURATION_HINT}")
    text = value.strip()
    if _NUMBER_RE.fullmatch(text):
        return float(text)
    if not _DURATION_RE.fullmatch(text):
        raise ValueError(f"expected {DURATION_HINT}")
    total = Fraction(0)
    for number, unit in _DURATION_PART_RE.findall(text):
        total += Fraction(number) * Fraction(_DURATION_UNITS[unit])
    return float(total)


def format_size(n: int) -> str:
    """Render a byte count the way a user would write it: `64MiB`, `1.5GiB`, `512B`."""
    if n < 0:
        return "-" + format_size(-n)
    for unit, name in ((TiB, "TiB"), (GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit:
            if n % unit == 0:
                return f"{n // unit}{name}"
            return f"{n / unit:.2f}".rstrip("0").rstrip(".") + name
    return f"{n}B"


def format_duration(seconds: float) -> str:
    """Render seconds the way a user would write them: `30s`, `1h30m`, `7d`, `500ms`."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    millis = round(seconds * 1000)
    if millis == 0:
        return "0s"
    if millis % 1000:
        if millis < 1000:
            return f"{millis}ms"
        return f"{seconds:g}s"
    rest = millis // 1000
    parts = []
    for size, name in ((86400, "d"), (3600, "h"), (60, "m"), (1, "s")):
        if rest >= size:
            parts.append(f"{rest // size}{name}")
            rest %= size
    return "".join(parts)
