"""Evaluation output: an aligned text table, one JSON document, or a CSV file."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from kvcompress import report as shared_report
from kvcompress.eval.runner import EvalResult, Row

__all__ = ["format_cell", "format_table", "print_json", "write_csv"]


def format_cell(key: str, value: Any) -> str:
    """Text for one table cell; precision chosen per column so the table stays narrow."""
    if isinstance(value, float):
        if key == "kl":
            return f"{value:.4f}"
        if key == "agreement":
            return f"{value:.3f}"
        if key == "rate":
            return f"{value:g}"
        if key == "achieved_rate":
            return f"{value:.2f}"
        return f"{value:.1f}"
    return str(value)


def format_table(rows: Sequence[Row]) -> str:
    """Rows as right-aligned columns under a header; columns follow `Row.as_dict`."""
    return shared_report.format_table([row.as_dict() for row in rows], format_cell)


def print_json(result: EvalResult, file: IO[str] | None = None) -> None:
    """The whole result as one JSON document (and nothing else) on `file` or stdout."""
    out = file or sys.stdout
    json.dump(result.document(), out, indent=2)
    out.write("\n")


def write_csv(rows: Sequence[Row], path: str | Path) -> Path:
    """One CSV line per row; the header is the union of the rows' columns."""
    dicts = [row.as_dict() for row in rows]
    keys: list[str] = []
    for d in dicts:
        keys += [k for k in d if k not in keys]
    target = Path(path)
    if target.parent != Path():
        target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(dicts)
    return target
