"""``kvcompress bench longctx`` at tiny sizes: bounded peak memory, agreement, report shape."""

from __future__ import annotations

import csv
import json

import pytest

from kvcompress.bench.longctx import LongctxBenchConfig, prompt_lengths, run_longctx_bench
from kvcompress.compress import CompressionParams
from kvcompress.entrypoints.cli.main import build_parser, main

HEADS = 30 * 3  # the embedded SmolLM2-135M: layers x KV heads
BLOCK_SIZE = 16
CHUNK = 32
# 756 blocks: the 64-token prompt fits uncompressed (4 blocks per head), the 160-token one
# (10 per head, 900 blocks) does not.
TINY = [
    "--lengths", "64,160", "--output-len", "4", "--agreement-tokens", "12",
    "--kv-cache-memory", "6MiB", "--max-cache-tokens", "48", "--min-cache-tokens", "0",
    "--prefill-chunk-size", str(CHUNK), "--reference-memory", "12MiB",
]  # fmt: skip


@pytest.mark.parametrize("mode", ["every-chunk", "when-needed"])
def test_peak_memory_is_bounded_and_agreement_measured(mode):
    cfg = LongctxBenchConfig(
        lengths=(160, 64),  # sorted by the run
        output_len=4,
        agreement_tokens=12,
        kv_cache_memory="6MiB",
        max_cache_tokens=48,
        reference_memory="12MiB",
        prefill_chunk_size=CHUNK,
        compression=CompressionParams(min_cache_tokens=0),
        prefill_compression=mode,
    )
    result = run_longctx_bench(cfg)
    short, long = result.rows
    assert [short["prompt_tokens"], long["prompt_tokens"]] == [64, 160]
    budget = result.engine["budget_bytes"]
    per_block = result.engine["bytes_per_block"]
    # The test proves something: the long prompt could not be held uncompressed.
    assert long["uncompressed_kv_bytes"] > budget
    assert long["peak_kv_bytes"] < long["uncompressed_kv_bytes"]
    # The real high-water mark, between a chunk's append and its compression: at least the
    # budget (48 tokens = 3 blocks per head) plus the chunk's 2 blocks per head.
    budget_and_chunk = HEADS * (3 + 2) * per_block
    assert long["peak_kv_bytes"] >= budget_and_chunk
    if mode == "every-chunk":
        # Bounded: the longer prompt holds at most one more chunk's blocks than the shorter.
        chunk_bytes = HEADS * -(-CHUNK // BLOCK_SIZE) * per_block
        assert long["peak_kv_bytes"] <= short["peak_kv_bytes"] + chunk_bytes
    else:
        # Chunks pile up uncompressed until the next does not fit: bounded by the pool.
        assert budget_and_chunk < long["peak_kv_bytes"] <= budget
    assert short["peak_kv_bytes"] <= long["peak_kv_bytes"]
    assert long["peak_vs_shortest"] == long["peak_kv_bytes"] / short["peak_kv_bytes"]
    for row in result.rows:
        assert row["preemptions"] == 0
        assert row["prefill_s"] > 0 and row["decode_tok_s"] > 0
        assert row["agreement_positions"] == 12
        for key in ("agreement_chunked", "agreement_one_shot"):
            assert 0.0 <= row[key] <= 1.0
        assert row["agreement_diff"] == row["agreement_chunked"] - row["agreement_one_shot"]


def test_cli_json_csv_without_reference(capsys, tmp_path):
    path = tmp_path / "longctx.csv"
    argv = ["bench", "longctx", *TINY, "--no-reference", "--json", "--csv", str(path)]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"config", "rows"}
    assert doc["config"]["longctx"]["reference"] is False
    assert doc["config"]["longctx"]["compression"]["min_cache_tokens"] == 0
    assert doc["config"]["engine"]["chunk_size"] == CHUNK
    rows = doc["rows"]
    assert [r["prompt_tokens"] for r in rows] == [64, 160]
    for row in rows:
        assert {
            "peak_kv_bytes",
            "peak_vs_shortest",
            "uncompressed_kv_bytes",
            "prefill_s",
            "prefill_s_per_1k",
            "per_1k_vs_shortest",
            "prefill_tok_s",
            "decode_tok_s",
        } <= set(row)
        assert not any(key.startswith("agreement") for key in row)
    with path.open(newline="") as f:
        assert [int(r["prompt_tokens"]) for r in csv.DictReader(f)] == [64, 160]


def test_cli_defaults_and_refusals(capsys):
    args = build_parser().parse_args(["bench", "longctx"])
    assert args.lengths == (1024, 2048, 4096, 8192)
    assert (args.kv_cache_memory, args.max_cache_tokens, args.output_len) == ("24MiB", 256, 32)
    assert (args.agreement_tokens, args.no_reference, args.prefill_chunk_size) == (64, False, None)
    with pytest.raises(SystemExit):
        main(["bench", "longctx", "--lengths", "0"])
    assert "expected integers >= 1" in capsys.readouterr().err


def test_the_longest_prompt_is_capped_to_the_context():
    cfg = LongctxBenchConfig(output_len=32)
    assert prompt_lengths(cfg, 8192) == [1024, 2048, 4096, 8192 - 32 - 1]
    assert prompt_lengths(LongctxBenchConfig(lengths=(9000, 10000)), 8192) == [8159]
    with pytest.raises(ValueError, match="output_len"):
        LongctxBenchConfig(output_len=1)
