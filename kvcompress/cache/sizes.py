"""Human-readable byte sizes ("2GiB", "512MB", 1 << 30)."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str, allow_zero: bool = False) -> int:
    """Bytes from an int or a string such as ``"2GiB"``, ``"1.5 GB"`` or ``"4096"``
    (positive, or also 0 with ``allow_zero``)."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int | float):
        number, unit = float(value), ""
    else:
        match = _PATTERN.match(value)
        if match is None:
            raise ValueError(f"not a size: {value!r} (expected e.g. '2GiB', '512MB', 1048576)")
        number, unit = float(match.group(1)), match.group(2).lower()
        if unit not in _UNITS:
            raise ValueError(f"unknown size unit {match.group(2)!r} in {value!r}")
    size = int(number * _UNITS[unit])
    if size < 0 or (size == 0 and not allow_zero):
        raise ValueError(f"size must be {'>= 0' if allow_zero else 'positive'}, got {value!r}")
    return size


def format_size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes} B"
