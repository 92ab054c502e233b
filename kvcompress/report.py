"""Reports of the commands (bench, eval, generate): an aligned table, one JSON document on
stdout, or a CSV file."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_table(
    rows: Sequence[Mapping[str, Any]],
    cell: Callable[[str, Any], str] = lambda _key, value: format_value(value),
) -> str:
    """Rows as right-aligned columns under a header: the union of the rows' keys, in
    first-seen order, with "-" where a row lacks a key."""
    if not rows:
        return "(no rows)"
    keys = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[cell(k, row[k]) if k in row else "-" for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.rjust(w) for k, w in zip(keys, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)) for c in cells]
    return "\n".join(lines)


def print_table(rows: Sequence[Mapping[str, Any]], file=None) -> None:
    print(format_table(rows), file=file or sys.stdout)


def print_json(document: Any, file=None) -> None:
    json.dump(document, file or sys.stdout, indent=2)
    print(file=file or sys.stdout)


def jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or infinity
    if isinstance(value, Mapping):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    return value


def emit_report(config: Any, rows: Sequence[Mapping[str, Any]], as_json: bool, header: str) -> None:
    """One JSON document ``{"config", "rows"}`` on stdout, or a header line and a table."""
    if as_json:
        print_json(jsonable({"config": config, "rows": list(rows)}))
    else:
        print(header)
        print_table(rows)


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """One CSV line per row; the header is the union of the rows' keys, in first-seen order."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return target
