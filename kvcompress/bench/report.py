"""Printing benchmark rows as an aligned table or one JSON document."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_table(rows: Sequence[Mapping[str, Any]], file=None) -> None:
    file = file or sys.stdout
    if not rows:
        print("(no rows)", file=file)
        return
    keys = list(dict.fromkeys(k for row in rows for k in row))  # union, first-seen order
    cells = [[format_value(row[k]) if k in row else "-" for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.rjust(w) for k, w in zip(keys, widths, strict=True)), file=file)
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)), file=file)


def print_json(document: Any, file=None) -> None:
    json.dump(document, file or sys.stdout, indent=2)
    print(file=file or sys.stdout)
