"""``kvcompress inspect`` on the shared engine: ``LLMEngine.inspect_kept`` prefills one
prompt alone (compressing as a request would) and reads what each head kept."""

from __future__ import annotations

import argparse
import json

from kvcompress.entrypoints.cli.inspect_kept import add_inspect_parser, run_inspect
from kvcompress.eval import Span, explain, spans_of_text, tokens_overlapping
from tests.eval.shared_engine import shared_engine

PROMPT = (
    "Notes from the harbour. The tide was low and the boats rested on the mud. "
    "The special magic number is 1585963. Gulls circled the market while fishermen "
    "sorted their catch and argued about the weather. "
) * 2


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kvcompress")
    add_inspect_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["inspect", *argv])


def test_tokens_of_a_text_span():
    text = "ab 1585963 cd"
    offsets = [(0, 2), (2, 6), (6, 10), (10, 13), (0, 0)]
    assert tokens_overlapping(offsets, 3, 10) == [1, 2]
    assert spans_of_text(text, offsets, "1585963").positions == [1, 2]
    assert spans_of_text(text, offsets, "zz").positions == []


def test_inspect_reports_each_heads_budget_and_the_span(capsys, tmp_path):
    engine = shared_engine()
    free = engine.capacity().free_blocks
    args = parse(
        PROMPT,
        "--span",
        "1585963",
        "--tokens",
        "0:4",
        "--max-cache-tokens",
        "24",
        "--protected-window",
        "4",
        "--json",
        "--plot-dir",
        str(tmp_path),
    )
    assert run_inspect(args, engine) == 0
    doc = json.loads(capsys.readouterr().out)
    cap = engine.capacity()
    assert len(doc["heads"]) == cap.heads
    assert sum(h["kept"] for h in doc["heads"]) <= 24 * cap.heads
    digits = doc["spans"][0]
    assert digits["label"] == "1585963" and len(digits["positions"]) >= 2
    first = doc["heads"][0]
    kept, total = map(int, first["1585963 kept"].split("/"))
    assert total == len(digits["positions"]) and 0 <= kept <= total
    assert len(first["0:4 ranks"].split()) == 4
    assert (tmp_path / "inspect_kept_spans.png").stat().st_size > 0
    assert engine.capacity().free_blocks == free


def test_explanation_agrees_with_kept_kvs():
    engine = shared_engine()
    ids = engine.tokenize(PROMPT)
    kept = engine.inspect_kept(ids, {"max_cache_tokens": 24, "protected_window": 4})
    last = len(ids) - 1
    ex = explain(kept, [Span("end", [last])])
    assert ex.held[..., 0].eq(1).all()  # the protected window is kept by every head
    assert ex.ranks[0].ge(0).all()
