"""Tiny random Llama, Mistral and Qwen2 configs through the paged per-head cache match
transformers: batched prefill of ragged prompts, then batched decode steps."""

from __future__ import annotations

import pytest
import torch

from kvcompress.attention import TorchAttentionBackend
from kvcompress.cache import CacheConfig, PagedKVCache
from kvcompress.compress import CompressionParams, MetricConfig
from kvcompress.engine.model_runner import ModelRunner
from kvcompress.engine.sampling import SamplingParams
from kvcompress.engine.sequence import Sequence
from kvcompress.models import LlamaForCausalLM, ModelConfig
from tests.engine.test_window_queries import expected_query
from tests.models.test_parity import BUILDERS, _random_hf


def tiny_runner(hf) -> tuple[ModelRunner, PagedKVCache]:
    config = ModelConfig.from_hf(hf.config)
    cache = PagedKVCache(
        CacheConfig(
            num_layers=config.num_layers,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            kv_cache_memory="16MiB",
            block_size=4,
            max_seqs=4,
            max_model_len=128,
        )
    )
    model = LlamaForCausalLM(config, TorchAttentionBackend(cache)).eval()
    model.load_state_dict(hf.state_dict())
    return ModelRunner(model, cache, torch.device("cpu")), cache


@pytest.mark.parametrize("lengths", [(13, 30), (17, 17)], ids=["ragged", "equal"])
@pytest.mark.parametrize("collect_metric", [False, True], ids=["fused", "with-metric"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_paged_prefill_and_decode_match_transformers(
    name: str, collect_metric: bool, lengths: tuple[int, int]
) -> None:
    hf = _random_hf(name)
    runner, cache = tiny_runner(hf)
    # Evicting parameters make the backend collect the metric; nothing is compressed here.
    params = (
        CompressionParams(compression_rate=2, min_cache_tokens=0)
        if collect_metric
        else CompressionParams()
    )
    gen = torch.Generator().manual_seed(2)
    vocab = hf.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
    seqs = [Sequence(f"s{i}", p, SamplingParams(), params) for i, p in enumerate(prompts)]
    for seq in seqs:
        seq.slot = cache.allocate_seq()

    got = [prefill(runner, seqs)]
    for _ in range(6):
        for seq in seqs:
            seq.output_token_ids.append(int(torch.randint(0, vocab, (1,), generator=gen)))
        got.append(decode(runner, seqs))

    with torch.inference_mode():
        for i, seq in enumerate(seqs):
            expected = hf(input_ids=torch.tensor([seq.token_ids])).logits[0]
            n = len(seq.prompt_token_ids)
            rows = torch.stack([step[i] for step in got])  # logits after each fed token
            torch.testing.assert_close(rows, expected[n - 1 :], atol=2e-4, rtol=2e-4)


def prefill(runner: ModelRunner, seqs: list[Sequence]) -> torch.Tensor:
    """Feed each sequence's whole prompt in one step; the logits after it."""
    counts = [seq.num_uncomputed for seq in seqs]
    logits = runner.run(seqs, counts, 0, list(range(len(seqs)))).logits
    for seq, n in zip(seqs, counts, strict=True):
        seq.num_computed += n
        seq.prefilled = True
    return logits


def decode(runner: ModelRunner, seqs: list[Sequence]) -> torch.Tensor:
    logits = runner.run(seqs, [1] * len(seqs), len(seqs), list(range(len(seqs)))).logits
    for seq in seqs:
        seq.num_computed += 1
    return logits


def held_metric(cache: PagedKVCache, slot: int) -> torch.Tensor:
    """The metric of every KV a sequence holds, over all its (layer, head) rows."""
    view = cache.head_view(torch.tensor([slot]))
    return view.gather(cache.metric)[view.valid()]


def run_steps(runner: ModelRunner, seqs: list[Sequence], steps: int, vocab: int) -> None:
    gen = torch.Generator().manual_seed(5)
    prefill(runner, seqs)
    for _ in range(steps):
        for seq in seqs:
            seq.append_token(int(torch.randint(0, vocab, (1,), generator=gen)))
        decode(runner, seqs)


@pytest.mark.parametrize(
    "params",
    [
        CompressionParams(policy="streaming", compression_rate=2, min_cache_tokens=0),
        CompressionParams(policy="random", compression_rate=2, min_cache_tokens=0),
        CompressionParams(policy="full", compression_rate=2, min_cache_tokens=0),
        CompressionParams(),  # kvcompress, but nothing to evict
    ],
    ids=["streaming", "random", "full", "no-budget"],
)
def test_sequences_that_do_not_score_by_the_metric_leave_it_alone(params) -> None:
    hf = _random_hf("mistral-gqa")
    runner, cache = tiny_runner(hf)
    seq = Sequence("s", list(range(1, 12)), SamplingParams(), params)
    seq.slot = cache.allocate_seq()
    assert not seq.collects_metric
    run_steps(runner, [seq], 3, hf.config.vocab_size)
    assert bool((held_metric(cache, seq.slot) == 0).all())


def test_compress_once_sequence_stops_collecting_after_its_compression() -> None:
    hf = _random_hf("mistral-gqa")
    runner, cache = tiny_runner(hf)
    params = CompressionParams(compression_rate=2, compress_once=True, min_cache_tokens=0)
    seqs = [Sequence(f"s{i}", list(range(1, 12)), SamplingParams(), params) for i in range(2)]
    for seq in seqs:
        seq.slot = cache.allocate_seq()
    seqs[0].compressions = 1  # as the scheduler records after the first compression
    seqs[0].prefilled = True
    assert not seqs[0].collects_metric and seqs[1].collects_metric
    run_steps(runner, seqs, 3, hf.config.vocab_size)
    assert bool((held_metric(cache, seqs[0].slot) == 0).all())
    assert bool((held_metric(cache, seqs[1].slot) > 0).any())


@pytest.mark.parametrize("is_prefill", [True, False], ids=["prefill", "decode"])
def test_every_layer_gets_the_one_metadata_of_its_step(is_prefill: bool) -> None:
    hf = _random_hf("llama-gqa-llama3-bias")
    runner, cache = tiny_runner(hf)
    backend = runner.model.attention_backend
    metas = []
    real_forward = backend.forward

    def recording(layer, q, k, v, meta):
        metas.append(meta)
        return real_forward(layer, q, k, v, meta)

    backend.forward = recording
    params = CompressionParams(compression_rate=2, min_cache_tokens=0)
    # The second request collects its metric its own way; the first as the engine does.
    own = params.with_overrides(window_size=2, pool_kernel=5, collection_buffer=1)
    seqs = [
        Sequence(f"s{i}", [1, 2, 3, 4 + i], SamplingParams(), p)
        for i, p in enumerate([params, own])
    ]
    for seq in seqs:
        seq.slot = cache.allocate_seq()
    prefill(runner, seqs)
    if not is_prefill:
        for seq in seqs:
            seq.append_token(7)
        metas.clear()
        decode(runner, seqs)
    layers = hf.config.num_hidden_layers
    assert len(metas) == layers and all(m is metas[0] for m in metas)
    meta = metas[0]
    assert meta.num_decode == (0 if is_prefill else 2)
    assert meta.query_lens == ([4, 4] if is_prefill else [1, 1])
    assert (meta.decode is None) is is_prefill
    assert meta.capture is None  # no sequence reads its newest query
    settings = [runner.metric, MetricConfig(window_size=2, pool_kernel=5, collection_buffer=1)]
    if is_prefill:
        assert [(c.start, c.end, c.metric_power, c.history) for c in meta.chunks] == [
            (0, 4, 2, None),
            (4, 8, 2, None),
        ]
        assert [c.metric for c in meta.chunks] == settings
    else:
        assert meta.decode.metric_power.tolist() == [2, 2] and not meta.chunks
        assert meta.decode.collection_buffer.tolist() == [0, 1] and meta.decode.any_buffer
    if not is_prefill:
        assert meta.decode.blocks.shape[0] == layers


def record_queries(runner) -> list[torch.Tensor]:
    """The queries the backend gets, one per layer and step, appended as the runner runs."""
    backend = runner.model.attention_backend
    queries: list[torch.Tensor] = []
    real_forward = backend.forward

    def recording(layer, q, k, v, meta):
        queries.append(q.clone())
        return real_forward(layer, q, k, v, meta)

    backend.forward = recording
    return queries


def test_the_newest_query_is_kept_per_layer_for_last_query_sequences_only() -> None:
    """In a batch of chunks, then of decodes, the kept row of a last-query sequence is the
    query (post-RoPE, as the backend got it) of its newest token in every layer; the others
    keep nothing."""
    hf = _random_hf("llama-gqa-llama3-bias")
    runner, cache = tiny_runner(hf)
    queries = record_queries(runner)
    budget = dict(compression_rate=2, min_cache_tokens=0)
    params = [
        CompressionParams(**budget),  # window: collects the metric, keeps no query
        CompressionParams(scorer="last-query", **budget),
        CompressionParams(scorer="last-query"),  # no budget: will never compress
    ]
    seqs = [
        Sequence(f"s{i}", list(range(1, n + 1)), SamplingParams(), p)
        for i, (n, p) in enumerate(zip([5, 7, 6], params, strict=True))
    ]
    for seq in seqs:
        seq.slot = cache.allocate_seq()
    assert [s.keeps_last_query for s in seqs] == [False, True, False]
    layers = hf.config.num_hidden_layers
    prefill(runner, seqs)
    newest = 5 + 7 - 1  # the second sequence's last prompt token in the flat batch
    kept = runner.kept_queries.newest.get([s.slot for s in seqs])
    assert kept.shape == (3, layers, hf.config.num_attention_heads, hf.config.head_dim)
    for layer in range(layers):
        torch.testing.assert_close(kept[1, layer], queries[layer][newest])
    assert bool((kept[[0, 2]] == 0).all())
    queries.clear()
    for seq in seqs:
        seq.append_token(3)
    decode(runner, seqs)
    kept = runner.kept_queries.newest.get([seqs[1].slot])
    for layer in range(layers):
        torch.testing.assert_close(kept[0, layer], queries[layer][1])


def test_the_expected_query_is_kept_for_expected_attention_chunks_only() -> None:
    """The kept query of an expected-attention sequence comes from its chunk's last
    ``window_size`` tokens at their positions, per layer and query head (a chunk shorter than
    the window: all its tokens); decode steps leave it alone."""
    hf = _random_hf("llama-gqa-llama3-bias")
    runner, cache = tiny_runner(hf)
    queries = record_queries(runner)
    budget = dict(compression_rate=2, min_cache_tokens=0, scorer="expected-attention")
    params = [
        CompressionParams(compression_rate=2, min_cache_tokens=0),  # window: keeps nothing
        CompressionParams(window_size=3, **budget),
        CompressionParams(window_size=16, **budget),  # longer than its 6-token chunk
    ]
    seqs = [
        Sequence(f"s{i}", list(range(1, n + 1)), SamplingParams(), p)
        for i, (n, p) in enumerate(zip([5, 7, 6], params, strict=True))
    ]
    for seq in seqs:
        seq.slot = cache.allocate_seq()
    assert [s.keeps_window_queries for s in seqs] == [False, True, True]
    layers = hf.config.num_hidden_layers
    prefill(runner, seqs)
    mean = runner.kept_queries.windows.get([s.slot for s in seqs])
    assert mean.shape == (3, layers, hf.config.num_attention_heads, hf.config.head_dim)
    # Rows 5-11 of the step are s1's tokens at positions 0-6, rows 12-17 s2's at 0-5.
    for row, window, positions in [(1, range(9, 12), [4, 5, 6]), (2, range(12, 18), range(6))]:
        recorded = torch.stack([queries[layer][list(window)] for layer in range(layers)], 1)
        want = expected_query(recorded, list(positions), runner.model.rotary)
        torch.testing.assert_close(mean[row], want, atol=1e-5, rtol=1e-4)
    assert bool((mean[0] == 0).all())
    for seq in seqs:
        seq.append_token(3)
    decode(runner, seqs)
    assert torch.equal(runner.kept_queries.windows.get([s.slot for s in seqs]), mean)
