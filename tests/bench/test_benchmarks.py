"""Tiny versions of the benchmark commands: their output structure, not their speed."""

from __future__ import annotations

import json

import pytest

from kvcompress.bench.memory import MemoryBenchConfig, run_memory_bench
from kvcompress.bench.throughput import ThroughputBenchConfig, plot_speedup, run_throughput_bench
from kvcompress.compress import CompressionParams
from kvcompress.entrypoints.cli.main import main

THROUGHPUT_KEYS = {
    "rate",
    "total_tokens_per_s",
    "output_tokens_per_s",
    "peak_concurrent_seqs",
    "peak_kv_bytes",
    "compression_s",
    "preemptions",
    "swaps",
    "speedup",
}


def test_memory_bench_rows_and_exact_physical_memory():
    # min_cache_tokens 0: the default floor (128 per head) would stop rate 64 at rate 2.
    cfg = MemoryBenchConfig(
        prompt_len=256,
        num_seqs=2,
        num_layers=4,
        rates=(1, 4, 64),
        repeats=1,
        compression=CompressionParams(min_cache_tokens=0),
    )
    rows = run_memory_bench(cfg)
    assert [r["rate"] for r in rows] == [1, 4, 64]
    for row in rows:
        assert row["kvs_seen"] == 256 * 2 * 4 * 3
        assert row["physical_kvs"] == row["kvs_kept"]  # evicting heads keep whole blocks
        assert row["physical_over_theoretical"] == 1.0
    assert rows[0]["kvs_kept"] == rows[0]["kvs_seen"]
    assert rows[2]["kvs_kept"] < rows[1]["kvs_kept"] < rows[0]["kvs_kept"]


def test_memory_bench_json_is_one_document(capsys):
    argv = ["bench", "memory", "--prompt-len", "64", "--num-seqs", "1", "--rates", "1,2"]
    assert main([*argv, "--repeats", "1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [row["rate"] for row in doc["rows"]] == [1, 2]
    assert {"kvs_seen", "kvs_kept", "physical_kvs", "ms_per_million_kvs"} <= set(doc["rows"][0])


@pytest.mark.parametrize("scorer", ["window", "key-norm", "expected-attention", "last-query"])
def test_memory_bench_times_every_scorer(scorer):
    # last-query needs the newest query, which the bench draws (the engine would hand it).
    cfg = MemoryBenchConfig(
        prompt_len=128,
        num_seqs=2,
        num_layers=2,
        rates=(4,),
        repeats=1,
        compression=CompressionParams(min_cache_tokens=0, scorer=scorer),
    )
    (row,) = run_memory_bench(cfg)
    assert row["kvs_kept"] < row["kvs_seen"]
    assert row["physical_kvs"] == row["kvs_kept"]
    assert row["ms_per_million_kvs"] > 0


def test_memory_bench_header_names_the_scorer(capsys):
    argv = ["bench", "memory", "--prompt-len", "64", "--num-seqs", "1", "--rates", "2"]
    assert main([*argv, "--repeats", "1", "--scorer", "last-query"]) == 0
    assert "scorer last-query" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", ["bfloat16", "fp8"])
def test_memory_bench_compresses_a_narrow_pool(dtype, capsys):
    argv = ["bench", "memory", "--prompt-len", "128", "--num-seqs", "2", "--rates", "4"]
    argv += ["--repeats", "1", "--scorer", "last-query", "--min-cache-tokens", "0"]
    assert main([*argv, "--kv-cache-dtype", dtype, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["config"]["kv_cache_dtype"] == dtype
    (row,) = doc["rows"]
    assert row["physical_kvs"] == row["kvs_kept"] < row["kvs_seen"]
    with pytest.raises(ValueError, match="unknown KV cache dtype"):
        MemoryBenchConfig(kv_cache_dtype="int4")


def test_memory_bench_refuses_query_heads_not_a_multiple_of_kv_heads():
    with pytest.raises(ValueError, match="num_q_heads"):
        MemoryBenchConfig(num_q_heads=4, num_kv_heads=3)


def test_bad_rates_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "memory", "--rates", "0.5"])
    assert "rates must be numbers >= 1" in capsys.readouterr().err


def test_throughput_bench_rows_speedup_and_plot(tmp_path):
    cfg = ThroughputBenchConfig(
        num_prompts=3,
        input_len=48,
        output_len=6,
        rates=(1, 8),
        kv_cache_memory=str(90 * 6 * 8320),  # about one uncompressed sequence at a time
        transformers_baseline=True,
    )
    rows = run_throughput_bench(cfg)
    assert [r["rate"] for r in rows] == [1, 8, "transformers"]
    for row in rows:
        assert set(row) >= THROUGHPUT_KEYS
        assert row["total_tokens_per_s"] > 0
    assert rows[0]["speedup"] == 1.0
    assert rows[1]["peak_concurrent_seqs"] >= rows[0]["peak_concurrent_seqs"]
    png = plot_speedup(rows, tmp_path)
    assert png.exists() and png.stat().st_size > 1000


@pytest.mark.parametrize("swap_space", ["0", "1GiB"], ids=["recompute", "swap"])
def test_throughput_bench_overcommitted_admission_preempts_and_says_how(swap_space):
    cfg = ThroughputBenchConfig(
        num_prompts=3,
        input_len=48,
        output_len=24,
        rates=(1,),
        kv_cache_memory=str(90 * 8 * 8320),  # two prompts, not their growth
        transformers_baseline=False,
        decode_headroom=0,
        swap_space=swap_space,
    )
    [row] = run_throughput_bench(cfg)
    assert row["preemptions"] > 0
    assert row["swaps"] == (row["preemptions"] if swap_space != "0" else 0)


def test_throughput_bench_runs_in_the_dtypes_it_is_given(capsys):
    args = ["bench", "throughput", "--num-prompts", "2", "--input-len", "32"]
    args += ["--output-len", "3", "--rates", "1,4", "--no-transformers", "--json"]
    args += ["--kv-cache-memory", "8MiB", "--dtype", "bfloat16", "--kv-cache-dtype", "float32"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["config"]["dtype"], report["config"]["kv_cache_dtype"]) == (
        "bfloat16",
        "float32",
    )
    assert [r["rate"] for r in report["rows"]] == [1, 4]
    # Whole blocks of 16 float32 KVs (K and V of head dim 64, plus metric and position), not
    # of bfloat16 ones (16 x 264 bytes).
    assert report["rows"][0]["peak_kv_bytes"] % (16 * (2 * 64 * 4 + 8)) == 0
    with pytest.raises(SystemExit):
        main(["bench", "throughput", "--dtype", "int8"])


def test_throughput_bench_on_two_ranks_reports_each_ranks_memory(tmp_path, capsys):
    from tests.engine.test_tensor_parallel import tiny_llama

    model = tiny_llama(tmp_path / "tiny", num_kv_heads=4, num_heads=8)
    args = ["bench", "throughput", "--model", str(model), "--tensor-parallel-size", "2"]
    args += ["--num-prompts", "2", "--input-len", "40", "--output-len", "4", "--rates", "1,4"]
    assert main([*args, "--kv-cache-memory", "1MiB", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["rate"] for r in rows] == [1, 4]  # no transformers baseline on two ranks
    for row in rows:
        per_rank = [row["peak_kv_bytes_rank0"], row["peak_kv_bytes_rank1"]]
        assert min(per_rank) > 0 and sum(per_rank) == row["peak_kv_bytes"]
