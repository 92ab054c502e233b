"""Reading LongBench JSONL files from a local folder (nothing is downloaded)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kvcompress.eval.longbench.subsets import SUBSETS, spec_for

__all__ = ["LongBenchExample", "available_subsets", "load_longbench"]


@dataclass(frozen=True)
class LongBenchExample:
    """One line of a LongBench JSONL file (`_id` is renamed `id`)."""

    input: str
    context: str
    answers: list[str] = field(hash=False)
    length: int
    dataset: str
    language: str
    all_classes: list[str] = field(hash=False)
    id: str


def _subset_file(data_dir: Path, subset: str, longbench_e: bool) -> Path:
    return data_dir / (f"{subset}_e.jsonl" if longbench_e else f"{subset}.jsonl")


def _check_dir(data_dir: str | Path) -> Path:
    path = Path(data_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"LongBench data directory not found: {path}. Expected a folder with one JSONL "
            f"file per subset, e.g. {path / 'hotpotqa.jsonl'} (or hotpotqa_e.jsonl for "
            "LongBench-E)."
        )
    return path


def _parse_line(line: str, subset: str, where: str) -> LongBenchExample:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: invalid JSON ({err.msg})") from err
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [key for key in ("input", "context", "answers") if key not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    answers = row["answers"]
    if isinstance(answers, str):
        answers = [answers]
    return LongBenchExample(
        input=str(row["input"] or ""),
        context=str(row["context"] or ""),
        answers=[str(answer) for answer in answers],
        length=int(row.get("length") or 0),
        dataset=str(row.get("dataset") or subset),
        language=str(row.get("language") or "en"),
        # LongBench stores null for subsets that are not classification tasks.
        all_classes=[str(label) for label in row.get("all_classes") or []],
        id=str(row.get("_id", "")),
    )


def load_longbench(
    data_dir: str | Path,
    subset: str,
    *,
    longbench_e: bool = False,
    limit: int | None = None,
) -> list[LongBenchExample]:
    """Read `<data_dir>/<subset>.jsonl` (or `<subset>_e.jsonl`), in file order.

    Blank lines are skipped; `limit` keeps the first N examples.
    """
    spec_for(subset, longbench_e)
    path = _subset_file(_check_dir(data_dir), subset, longbench_e)
    if not path.is_file():
        present = sorted(p.name for p in path.parent.glob("*.jsonl"))
        raise FileNotFoundError(
            f"LongBench subset file not found: expected {path}. "
            f"JSONL files present in {path.parent}: {present or 'none'}"
        )
    examples: list[LongBenchExample] = []
    with path.open(encoding="utf-8") as lines:
        for lineno, line in enumerate(lines, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if line.strip():
                examples.append(_parse_line(line, subset, f"{path}:{lineno}"))
    return examples


def available_subsets(data_dir: str | Path, *, longbench_e: bool = False) -> list[str]:
    """Supported subsets whose file exists in `data_dir`, in `SUBSETS` order."""
    path = _check_dir(data_dir)
    return [
        name
        for name, spec in SUBSETS.items()
        if (spec.in_longbench_e or not longbench_e)
        and _subset_file(path, name, longbench_e).is_file()
    ]
