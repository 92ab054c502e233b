"""Captured decode steps (engine/cuda_graphs.py): batch buckets; static buffers and padding
that change nothing against eager steps (on CPU the same static-buffer steps run without
capture, under Triton's interpreter); and, on CUDA, the engine's replayed graphs against its
eager steps."""

from __future__ import annotations

import pytest
import torch

from kvcompress.cache import FP8, CacheConfig, PagedKVCache
from kvcompress.compress import CompressionParams
from kvcompress.engine.cuda_graphs import DecodeGraphs, batch_buckets
from kvcompress.engine.model_runner import ModelRunner
from kvcompress.engine.sampling import SamplingParams
from kvcompress.engine.sequence import Sequence
from kvcompress.models import LlamaForCausalLM, ModelConfig
from tests.engine.test_model_runner import decode, prefill
from tests.models.test_parity import _random_hf

CUDA = torch.cuda.is_available()


def test_buckets_cover_every_batch_up_to_the_engine_limit() -> None:
    assert batch_buckets(1) == (1,)
    assert batch_buckets(5) == (1, 2, 4, 5)
    assert batch_buckets(64)[-3:] == (32, 48, 64)
    with pytest.raises(ValueError, match="max_batch"):
        batch_buckets(0)


def triton_runner(
    hf, graphs: bool, kv_dtype: torch.dtype = torch.float32
) -> tuple[ModelRunner, PagedKVCache]:
    pytest.importorskip("triton")
    from kvcompress.attention import TritonAttentionBackend

    config = ModelConfig.from_hf(hf.config)
    dev = torch.device("cuda" if CUDA else "cpu")
    cache = PagedKVCache(
        CacheConfig(
            num_layers=config.num_layers,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            kv_cache_memory="4MiB",
            block_size=4,
            max_seqs=5,
            max_model_len=64,
            dtype=kv_dtype,
            device=dev,
        ),
        debug_checks=False,
    )
    backend = TritonAttentionBackend(cache, block_n=16)
    model = LlamaForCausalLM(config, backend).eval()
    model.load_state_dict(hf.state_dict())
    model.to(dev)
    runner = ModelRunner(model, cache, dev)
    if graphs:
        runner.graphs = DecodeGraphs(model, cache, max_batch=5, use_graphs=CUDA)
        runner.graphs.capture()
    return runner, cache


def run_decodes(graphs: bool, kv_dtype: torch.dtype) -> tuple[list[torch.Tensor], PagedKVCache]:
    """Three ragged prompts (padded to bucket 4): one collecting nothing, one the metric with
    power 1 and a collection buffer, one with power 2; then decode steps."""
    hf = _random_hf("llama-gqa-llama3-bias")
    runner, cache = triton_runner(hf, graphs, kv_dtype)
    collect = CompressionParams(compression_rate=2, min_cache_tokens=0)
    # The last one collects: the padding rows repeat it.
    settings = [
        CompressionParams(),
        collect.with_overrides(metric="l1-sum", collection_buffer=2),
        collect,
    ]
    gen = torch.Generator().manual_seed(3)
    vocab = hf.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (9, 14, 5)]
    seqs = [
        Sequence(f"s{i}", p, SamplingParams(), params)
        for i, (p, params) in enumerate(zip(prompts, settings, strict=True))
    ]
    for seq in seqs:
        seq.slot = cache.allocate_seq()
    steps = [prefill(runner, seqs)]
    for _ in range(4):
        for seq in seqs:
            seq.append_token(int(torch.randint(0, vocab, (1,), generator=gen)))
        steps.append(decode(runner, seqs))
    return steps, cache


@pytest.mark.parametrize("kv_dtype", [torch.float32, FP8], ids=["fp32", "fp8"])
def test_static_buffer_steps_match_eager_steps_and_padding_changes_nothing(kv_dtype) -> None:
    eager, eager_cache = run_decodes(graphs=False, kv_dtype=kv_dtype)
    replayed, cache = run_decodes(graphs=True, kv_dtype=kv_dtype)
    for got, want in zip(replayed, eager, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # The padding rows recomputed the last sequence's K/V into its own slots and collected
    # nothing: pools and metric as after the eager steps.
    # An fp8 cache's scales came from the prefill, not from the capture's warm-up.
    for name in ("k_pool", "v_pool", "metric", "context_lens", "block_tables", "k_scale"):
        want, got = getattr(eager_cache, name), getattr(cache, name)
        if want.dtype == FP8:
            want, got = want.view(torch.uint8), got.view(torch.uint8)
        torch.testing.assert_close(got, want)


def test_a_batch_beyond_the_largest_bucket_is_refused() -> None:
    hf = _random_hf("llama-gqa-llama3-bias")
    pytest.importorskip("triton")
    runner, cache = triton_runner(hf, graphs=False)
    graphs = DecodeGraphs(runner.model, cache, max_batch=2, use_graphs=False)
    assert graphs.bucket(2) == 2 and graphs.bucket(3) is None
    per_seq = torch.zeros(4, 3, dtype=torch.long)
    plan = cache.prepare_append(torch.tensor([0, 1, 2]), torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="at most 2 sequences"):
        graphs.run(per_seq, torch.zeros(3, dtype=torch.long), plan, collects=False)


@pytest.mark.slow
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_engine_replaying_graphs_generates_what_eager_steps_do() -> None:
    from kvcompress.engine import EngineConfig, LLMEngine

    outputs = {}
    for eager in (True, False):
        engine = LLMEngine(
            EngineConfig(
                device="cuda", kv_cache_memory="256MiB", max_num_seqs=8, enforce_eager=eager
            )
        )
        assert engine.config.uses_cuda_graphs is not eager
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(100, 20000, (n,), generator=gen).tolist() for n in (40, 300, 7)]
        for i, prompt in enumerate(prompts):
            for rate in (None, 4.0):
                engine.add_request(
                    prompt,
                    SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
                    CompressionParams(compression_rate=rate, min_cache_tokens=0),
                    request_id=f"{i}-{rate}",
                )
        outputs[eager] = {o.request_id: o.token_ids for o in engine.run() if o.finished}
        assert engine.cache.audit().ok
        engine.close()
    # bfloat16 steps batched differently may flip a near tie: compare most tokens, not all.
    same = sum(
        a == b
        for rid in outputs[True]
        for a, b in zip(outputs[True][rid], outputs[False][rid], strict=True)
    )
    total = sum(len(t) for t in outputs[True].values())
    assert len(outputs[False]) == 6 and same >= 0.9 * total
