"""The torch backend's paged decode and prefill against dense reference attention, and the
per-step metadata it relies on."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kvcompress.attention import TorchAttentionBackend
from kvcompress.attention.metadata import QueryCapture, build_metadata
from kvcompress.cache import CacheConfig, PagedKVCache
from kvcompress.compress import MetricConfig

LAYERS, KV_HEADS, Q_HEADS, D, BS = 2, 2, 4, 8, 4


def make_cache() -> PagedKVCache:
    return PagedKVCache(
        CacheConfig(
            num_layers=LAYERS,
            num_kv_heads=KV_HEADS,
            head_dim=D,
            kv_cache_memory="1MiB",
            block_size=BS,
            max_seqs=4,
            max_model_len=64,
        )
    )


def held(cache: PagedKVCache, pool: torch.Tensor, layer: int, slot: int, head: int):
    """The KVs one head holds, in block-table order, and their flat slots."""
    n = int(cache.context_lens[layer, slot, head])
    blocks = cache.block_tables[layer, slot, head, : -(-n // BS)]
    flat = (blocks.view(-1, 1) * BS + torch.arange(BS)).reshape(-1)[:n]
    return pool.view(-1, D)[flat], flat


def prefilled(lengths: list[int], gen: torch.Generator):
    """A cache holding random KVs for sequences of these lengths."""
    cache = make_cache()
    slots = [cache.allocate_seq() for _ in lengths]
    plan = cache.prepare_append(torch.tensor(slots), torch.tensor(lengths))
    n = sum(lengths)
    for layer in range(LAYERS):
        k, v = (torch.randn(n, KV_HEADS, D, generator=gen) for _ in range(2))
        cache.write(layer, plan.slots[layer], k, v)
    return cache, slots


def decode_step(cache, backend, slots, powers, gen, buffers=None, capture=None):
    """One decode step of every sequence; ``buffers[i]``: sequence i's collection buffer."""
    seq_slots = torch.tensor(slots)
    plan = cache.prepare_append(seq_slots, torch.ones(len(slots), dtype=torch.long))
    meta = build_metadata(
        cache,
        seq_slots=seq_slots,
        append=plan,
        query_lens=[1] * len(slots),
        num_decode=len(slots),
        computed=[0] * len(slots),
        metric_powers=powers,
        metric_settings=[MetricConfig(collection_buffer=b) for b in buffers or [0] * len(slots)],
        capture=capture,
    )
    lens = cache.context_lens[:, seq_slots]
    uniform = bool((lens == lens.max()).all())
    assert meta.decode.uniform_len == (int(lens.max()) if uniform else None)
    B = len(slots)
    outs, inputs = [], []
    for layer in range(LAYERS):
        q = torch.randn(B, Q_HEADS, D, generator=gen)
        k, v = (torch.randn(B, KV_HEADS, D, generator=gen) for _ in range(2))
        outs.append(backend.forward(layer, q, k, v, meta))
        inputs.append(q)
    return outs, inputs


@pytest.mark.parametrize(
    ("lengths", "shrink"),
    [([7, 10], True), ([7, 10], False), ([9, 9], False)],
    ids=["compressed-head", "ragged", "uniform"],
)
@pytest.mark.parametrize("powers", [[0, 0], [2, 0], [1, 2]], ids=["fused", "l2+none", "l1+l2"])
@pytest.mark.parametrize(
    "buffers", [[0, 0], [3, 3], [3, 0]], ids=["no-buffer", "buffer", "mixed-buffers"]
)
def test_decode_matches_dense_attention_and_accumulates_the_metric(
    powers, lengths, shrink, buffers
) -> None:
    gen = torch.Generator().manual_seed(0)
    cache, slots = prefilled(lengths, gen)
    if shrink:
        # One head holds fewer KVs than its neighbours (as after a per-head compression).
        cache.context_lens[1, slots[0], 0] = 3
    backend = TorchAttentionBackend(cache)
    metric_before = cache.metric.clone()
    outs, qs = decode_step(cache, backend, slots, powers, gen, buffers)

    group = Q_HEADS // KV_HEADS
    expected_metric = metric_before.view(-1).clone()
    for layer in range(LAYERS):
        for i, slot in enumerate(slots):
            for h in range(KV_HEADS):
                keys, flat = held(cache, cache.k_pool, layer, slot, h)
                values, _ = held(cache, cache.v_pool, layer, slot, h)
                q = qs[layer][i, h * group : (h + 1) * group]  # [G, D]
                probs = torch.softmax(q @ keys.T * D**-0.5, dim=-1)
                got = outs[layer][i, h * group : (h + 1) * group]
                torch.testing.assert_close(got, probs @ values, atol=1e-5, rtol=1e-5)
                if powers[i]:
                    # Query-key pairs closer than the sequence's own collection buffer are
                    # not counted.
                    current = int(cache.seq_lens[slot]) - 1
                    far = (current - cache.position.view(-1)[flat]) >= buffers[i]
                    expected_metric[flat] += (probs ** powers[i]).sum(0) * far
    torch.testing.assert_close(cache.metric.view(-1), expected_metric, atol=1e-6, rtol=1e-5)


def test_prefill_of_equal_and_ragged_prompts_matches_causal_attention() -> None:
    gen = torch.Generator().manual_seed(1)
    for lengths in ([6, 6, 6], [5, 9]):
        cache = make_cache()
        slots = torch.tensor([cache.allocate_seq() for _ in lengths])
        plan = cache.prepare_append(slots, torch.tensor(lengths))
        meta = build_metadata(
            cache,
            num_decode=0,
            computed=[0] * len(lengths),
            seq_slots=slots,
            append=plan,
            query_lens=lengths,
            metric_powers=[0] * len(lengths),
        )
        n = sum(lengths)
        q = torch.randn(n, Q_HEADS, D, generator=gen)
        k, v = (torch.randn(n, KV_HEADS, D, generator=gen) for _ in range(2))
        out = TorchAttentionBackend(cache).forward(0, q, k, v, meta)
        start = 0
        for length in lengths:
            s = slice(start, start + length)
            group = Q_HEADS // KV_HEADS
            kr, vr = (t[s].repeat_interleave(group, 1).transpose(0, 1) for t in (k, v))
            ref = torch.nn.functional.scaled_dot_product_attention(
                q[s].transpose(0, 1), kr, vr, is_causal=True
            ).transpose(0, 1)
            torch.testing.assert_close(out[s], ref, atol=1e-5, rtol=1e-5)
            start += length
        # Keys and values went into the cache (token-major write).
        keys, _ = held(cache, cache.k_pool, 0, int(slots[-1]), 1)
        torch.testing.assert_close(keys, k[-lengths[-1] :, 1])


def test_layers_build_no_tensors_and_never_sync(monkeypatch) -> None:
    """Everything a layer needs is in the step's metadata: per layer, no tensor is built
    from Python values and nothing is read back to the host."""
    gen = torch.Generator().manual_seed(2)
    cache, slots = prefilled([5, 9], gen)
    backend = TorchAttentionBackend(cache)

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync or tensor construction inside a layer")

    real_forward = backend.forward
    real_getitem = torch.Tensor.__getitem__

    def getitem(self, index):
        # A boolean mask as an index has a data-dependent size: a device sync.
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            forbidden()
        return real_getitem(self, index)

    def guarded(*args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(torch, "tensor", forbidden)
            m.setattr(torch, "nonzero", forbidden)
            m.setattr(torch.Tensor, "__getitem__", getitem)
            for name in ("item", "tolist", "nonzero", "__int__", "__bool__", "__float__"):
                m.setattr(torch.Tensor, name, forbidden)
            return real_forward(*args, **kwargs)

    backend.forward = guarded
    store = torch.zeros(4, LAYERS, Q_HEADS, D)
    capture = QueryCapture(torch.tensor([1]), torch.tensor([slots[1]]), store)
    for powers in ([0, 0], [2, 1]):
        decode_step(cache, backend, slots, powers, gen)
    # Per-sequence buffers and a query capture add no sync either.
    decode_step(cache, backend, slots, [2, 1], gen, buffers=[3, 0], capture=capture)


def test_metadata_zeroes_the_power_of_sequences_that_collect_nothing() -> None:
    cache, slots = prefilled([3, 4], torch.Generator().manual_seed(3))
    seq_slots = torch.tensor(slots)
    plan = cache.prepare_append(seq_slots, torch.ones(2, dtype=torch.long))
    meta = build_metadata(
        cache,
        num_decode=2,
        computed=[0, 0],
        seq_slots=seq_slots,
        append=plan,
        query_lens=[1, 1],
        metric_powers=[0, 2],
    )
    assert meta.decode is not None and meta.decode.metric_power.tolist() == [0, 2]
    assert meta.decode.any_metric and not meta.chunks
    assert meta.decode.max_blocks == 2  # 5 KVs, blocks of 4
    assert meta.decode.uniform_len is None  # 4 and 5 KVs
    assert meta.decode.blocks.shape == (LAYERS, 2, KV_HEADS, 2)
    assert meta.decode.layer_blocks == (2,) * LAYERS
    assert meta.write_slots.shape == (LAYERS, 2 * KV_HEADS)


def test_package_does_not_import_the_torch_backend_eagerly() -> None:
    code = (
        "import sys, kvcompress.attention as a\n"
        "assert 'kvcompress.attention.torch_backend' not in sys.modules\n"
        "assert a.TorchAttentionBackend.__name__ == 'TorchAttentionBackend'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
