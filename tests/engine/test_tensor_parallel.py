"""Tensor parallelism on CPU (gloo): the engine's ranks give exactly what one device gives.

Greedy output, text and the KVs kept per (layer, KV head) after KV-Compress at rate 4 must
equal one device's: every rank scores its own heads, the chunk scores are all-gathered and
every rank makes the selection one device would. Each engine here starts its own worker
processes (a file rendezvous in a temporary directory: parallel runs do not collide).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from kvcompress.compress import CompressionParams
from kvcompress.engine import EngineConfig, LLMEngine, SamplingParams
from kvcompress.errors import InvalidParameterError
from tests.models.test_loader import save_random_llama, save_tokenizer

KVCOMPRESS = CompressionParams(
    policy="kvcompress", compression_rate=4, min_cache_tokens=8, protected_window=8
)
SETTINGS = {
    "off": CompressionParams(),
    "kvcompress": KVCOMPRESS,
    # Scores from each rank's own newest queries (TOVA), not from the metric.
    "last-query": KVCOMPRESS.with_overrides(scorer="last-query"),
    # From each rank's own window mean queries.
    "expected-attention": KVCOMPRESS.with_overrides(scorer="expected-attention"),
    # Drawn for the whole model on every rank: the same KVs as one device.
    "random": KVCOMPRESS.with_overrides(policy="random"),
    # Pooled over the tokens' spans: a chunk's spans reach every rank with its tokens, and
    # a compression's spans with its call.
    "spans": KVCOMPRESS.with_overrides(pool_spans=True),
    "last-query-spans": KVCOMPRESS.with_overrides(
        scorer="last-query", pool_spans=True, pool_kernel=1
    ),
}


def span_word(i: int) -> str:
    """Words that start spans (a space), numbers (digits) and word pieces that don't."""
    if i % 4 == 0:
        return str(i)
    return f"\u0120w{i}" if i % 3 == 0 else f"w{i}"


def tiny_llama(path: Path, num_kv_heads: int, num_heads: int) -> Path:
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=16 * num_heads,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=1024,
        eos_token_id=2,
        bos_token_id=1,
    )
    save_random_llama(path, cfg, 2)
    save_tokenizer(path, cfg.vocab_size, span_word)
    return path


def engine(model: Path | None, tp: int, **kwargs) -> LLMEngine:
    # Chunks of 64: the longer prompts' later chunks attend to KVs already compressed.
    options = {"kv_cache_memory": "4MiB", "block_size": 4, "prefill_chunk_size": 64}
    options = options if model else {}
    return LLMEngine(
        EngineConfig(
            model=str(model) if model else None,
            tensor_parallel_size=tp,
            **{**options, **kwargs},
        )
    )


def greedy(eng: LLMEngine, prompts: list[list[int]], max_tokens: int) -> dict[tuple, tuple]:
    """Every prompt under every setting at once: id -> (token ids, text, kept per head)."""
    for name, params in SETTINGS.items():
        for i, prompt in enumerate(prompts):
            sampling = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
            eng.add_request(prompt, sampling, params, request_id=f"{name}-{i}")
    return {
        out.request_id: (out.token_ids, out.text, out.kv.kept_per_layer_head)
        for out in eng.run()
        if out.finished
    }


def assert_all_free(eng: LLMEngine) -> None:
    stats = eng.stats()
    assert len(stats.ranks) == eng.config.tensor_parallel_size
    for rank in stats.ranks:
        assert rank.blocks_free == rank.blocks_total and rank.blocks_held == 0
    assert stats.blocks_free == stats.blocks_total == sum(r.blocks_total for r in stats.ranks)
    assert all(audit.ok and audit.pool_used == 0 for audit in eng.ranks.call("audit"))


def prompts_of(n: int, lengths: tuple[int, ...], seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(10, n, (k,), generator=gen).tolist() for k in lengths]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny-4kv"), num_kv_heads=4, num_heads=8)


@pytest.fixture(scope="module")
def tp2(tiny_dir: Path):
    eng = engine(tiny_dir, 2)
    yield eng
    eng.close()


def test_tp2_equals_one_device_with_and_without_compression(tiny_dir: Path, tp2) -> None:
    prompts = prompts_of(128, (150, 61, 97))
    want = greedy(engine(tiny_dir, 1), prompts, 16)
    got = greedy(tp2, prompts, 16)
    assert got == want
    # KV-Compress evicted, unevenly across heads (the selection is global, not per rank).
    kept = torch.tensor(got["kvcompress-0"][2])
    assert kept.sum() < 2 * 4 * (150 + 16) / 2
    assert len(set(kept.flatten().tolist())) > 1
    # The spans changed what was kept (kernel 21 both).
    assert got["spans-0"][2] != got["kvcompress-0"][2]
    assert_all_free(tp2)


def test_tp2_blocks_per_rank_and_aborts_leak_nothing(tp2) -> None:
    tp2.reset_peak_memory()
    for i, prompt in enumerate(prompts_of(128, (200, 40, 120), seed=3)):
        params = KVCOMPRESS if i % 2 else None
        tp2.add_request(prompt, SamplingParams(max_tokens=30), params, request_id=f"a{i}")
    for _ in range(3):
        tp2.step()
    stats = tp2.stats()
    assert stats.blocks_held > 0
    assert [r.rank for r in stats.ranks] == [0, 1]
    for rank in stats.ranks:
        assert 0 < rank.blocks_held == rank.blocks_total - rank.blocks_free <= rank.blocks_peak
    assert all(audit.ok for audit in tp2.ranks.call("audit"))
    assert tp2.abort_request("a0")  # mid-decode or mid-prefill: either way every rank frees
    tp2.step()
    assert tp2.abort_request("a2")
    list(tp2.run())
    assert_all_free(tp2)


def test_teacher_force_on_two_ranks_matches_and_analysis_of_one_cache_refuses(
    tiny_dir: Path, tp2
) -> None:
    prefix, continuation = prompts_of(128, (120, 6), seed=5)
    want = engine(tiny_dir, 1).teacher_force(prefix, continuation, KVCOMPRESS)
    got = tp2.teacher_force(prefix, continuation, KVCOMPRESS)
    # The row-parallel sums add in another order: the last bits of the logits may differ.
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
    assert got.kv == want.kv
    for call in (lambda: tp2.inspect_kept(prefix), tp2.to_transformers):
        with pytest.raises(InvalidParameterError, match="tensor_parallel_size=1"):
            call()
    assert_all_free(tp2)


def test_a_second_tensor_parallel_engine_in_the_process_is_refused(tiny_dir: Path, tp2) -> None:
    with pytest.raises(RuntimeError, match="close\\(\\) that engine first: one per process"):
        engine(tiny_dir, 2)
    assert tp2.stats().blocks_free == tp2.stats().blocks_total  # the first one carries on


def test_forks_share_blocks_on_every_rank_as_on_one_device(tiny_dir: Path, tp2) -> None:
    # n=2: the prefilled prompt forks, its blocks shared (and copied on write) on each rank.
    def run(eng: LLMEngine) -> list[tuple]:
        sampling = SamplingParams(n=2, max_tokens=12, temperature=0.8, seed=7)
        eng.add_request(prompts_of(128, (70,), seed=9)[0], sampling, KVCOMPRESS, request_id="f")
        outs = [o for o in eng.run() if o.finish_reason]
        return sorted((o.index, o.token_ids, o.kv.kept_per_layer_head) for o in outs)

    want = run(engine(tiny_dir, 1))
    assert run(tp2) == want and want[0][1] != want[1][1]
    assert_all_free(tp2)


def test_branches_on_two_ranks_equal_one_device(tiny_dir: Path, tp2) -> None:
    # One prefill on every rank, forked and compressed each its own way on every rank.
    branches = [
        KVCOMPRESS,
        KVCOMPRESS.with_overrides(compression_rate=8),
        SETTINGS["last-query"],
        KVCOMPRESS.with_overrides(policy="streaming"),
    ]

    def run(eng: LLMEngine) -> list[tuple]:
        sampling = SamplingParams(max_tokens=10, ignore_eos=True)
        ids = eng.add_branched_request(prompts_of(128, (70,), seed=5)[0], sampling, branches)
        outs = {o.request_id: o for o in eng.run() if o.finished}
        return [(outs[i].token_ids, outs[i].kv.kept_per_layer_head) for i in ids]

    want = run(engine(tiny_dir, 1))
    assert run(tp2) == want and want[0][1] != want[1][1]
    assert_all_free(tp2)
