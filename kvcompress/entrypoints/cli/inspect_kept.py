"""``kvcompress inspect``: which tokens of chosen spans each (layer, KV head) kept, and why.

Compresses ONE prompt with the given compression parameters and shows, per (layer, KV
head): the head's budget (KVs kept by the global selection), how many tokens of each span
survived and their metric ranks within the head (0: the highest metric; ``-``: evicted).
Spans are text (``--span 1585963``: every token overlapping an occurrence) or token index
ranges (``--tokens 120:128``). ``--plot-dir`` writes the same as a heat map, beside the
kept-KV heat map of ``kvcompress eval``.

Example: ``kvcompress inspect --prompt-file doc.txt --span 1585963 --compression-rate 8
--scorer key-norm``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kvcompress.entrypoints.cli.args import (
    add_compression_args,
    add_engine_args,
    compression_from_args,
    engine_config_from_args,
)
from kvcompress.entrypoints.cli.generate import read_prompt
from kvcompress.eval import (
    Span,
    explain,
    explanation_rows,
    plot_explanation,
    spans_of_text,
)
from kvcompress.report import format_table, jsonable, print_json

__all__ = ["add_inspect_parser", "parse_token_range", "prompt_spans", "run_inspect"]


def parse_token_range(text: str) -> tuple[int, int]:
    """``A:B`` -> token indices ``[A, B)``."""
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected START:END token indices, got {text!r}") from err
    if not 0 <= a < b:
        raise argparse.ArgumentTypeError(f"need 0 <= START < END, got {text!r}")
    return a, b


def add_inspect_parser(commands) -> argparse.ArgumentParser:
    p = commands.add_parser(
        "inspect",
        help="which tokens of chosen spans each KV head kept after compression",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompt", nargs="?", help="the prompt (or use --prompt-file, or stdin)")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--span", action="append", default=[], help="text to follow (repeatable)")
    p.add_argument(
        "--tokens",
        action="append",
        type=parse_token_range,
        default=[],
        metavar="START:END",
        help="token index range to follow (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--plot-dir", metavar="DIR", help="write the heat map here")
    add_compression_args(p)
    add_engine_args(p)
    p.set_defaults(func=run_inspect)
    return p


def prompt_spans(
    prompt: str,
    offsets: list[tuple[int, int]],
    texts: list[str],
    ranges: list[tuple[int, int]],
    num_tokens: int,
) -> list[Span]:
    """The spans to follow: each text's tokens, then each token range (clipped)."""
    spans = [spans_of_text(prompt, offsets, text) for text in texts]
    missing = [s.label for s in spans if not s.positions]
    if missing:
        raise ValueError(f"not found in the prompt: {', '.join(map(repr, missing))}")
    for a, b in ranges:
        if a >= num_tokens:
            raise ValueError(f"token range {a}:{b} is past the prompt's {num_tokens} tokens")
        spans.append(Span(f"{a}:{b}", list(range(a, min(b, num_tokens)))))
    return spans


def run_inspect(args: argparse.Namespace, engine: Any = None) -> int:
    """The ``inspect`` handler; ``engine`` lets a test pass a loaded engine."""
    prompt = read_prompt(args)
    compression = compression_from_args(args)
    if engine is None:
        from kvcompress.engine import LLMEngine

        engine = LLMEngine(engine_config_from_args(args, max_num_seqs=1))
    encoded = engine.tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    offsets = [tuple(o) for o in encoded["offset_mapping"]]
    spans = prompt_spans(prompt, offsets, args.span, args.tokens, len(ids))
    explanation = explain(engine.inspect_kept(ids, compression), spans)
    rows = explanation_rows(explanation)
    if args.json:
        print_json(
            jsonable(
                {
                    "compression": compression.to_dict(),
                    "tokens": len(ids),
                    "spans": [s._asdict() for s in spans],
                    "heads": rows,
                }
            )
        )
    else:
        kept = int(explanation.budgets.sum())
        print(
            f"kvcompress inspect: {len(ids)} tokens, {kept} KVs kept over "
            f"{explanation.budgets.numel()} heads; scorer {compression.effective_scorer}"
        )
        for span in spans:
            print(f"span {span.label!r}: tokens {span.positions}")
        print(format_table(rows))
    if args.plot_dir:
        directory = Path(args.plot_dir)
        directory.mkdir(parents=True, exist_ok=True)
        path = plot_explanation(explanation, directory / "inspect_kept_spans.png")
        print(f"wrote {path}", file=sys.stderr)
    return 0
