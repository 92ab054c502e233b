"""TritonAttentionBackend against TorchAttentionBackend on twin caches: a prefill that sets
the window metric, a per-head compression, then decode steps that add to it, for float32 and
fp8 caches (the torch path dequantises in its gather, the kernels in their loads)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kvcompress.attention import TorchAttentionBackend, TritonAttentionBackend
from kvcompress.attention.metadata import build_metadata
from kvcompress.cache import FP8, CacheConfig, PagedKVCache
from kvcompress.compress import MetricConfig

LAYERS, KV_HEADS, Q_HEADS, D, BS = 2, 2, 4, 16, 4
LENGTHS = [7, 12]


def run(backend_cls, kv_dtype: torch.dtype, settings: list[MetricConfig], steps: int = 2):
    cache = PagedKVCache(
        CacheConfig(
            num_layers=LAYERS,
            num_kv_heads=KV_HEADS,
            head_dim=D,
            kv_cache_memory="1MiB",
            block_size=BS,
            dtype=kv_dtype,
            max_seqs=4,
            max_model_len=64,
        )
    )
    if backend_cls is None:
        backend = TorchAttentionBackend(cache)
    else:
        backend = backend_cls(cache, block_n=16)
    gen = torch.Generator().manual_seed(0)
    slots = torch.tensor([cache.allocate_seq() for _ in LENGTHS])
    outs = []
    for step in range(steps + 1):
        prefill = step == 0
        counts = LENGTHS if prefill else [1] * len(LENGTHS)
        plan = cache.prepare_append(slots, torch.tensor(counts))
        meta = build_metadata(
            cache,
            seq_slots=slots,
            append=plan,
            query_lens=counts,
            num_decode=0 if prefill else len(counts),
            computed=[0] * len(counts),
            metric_powers=[2, 1],
            metric_settings=settings,
        )
        n = sum(counts)
        for layer in range(LAYERS):
            q = torch.randn(n, Q_HEADS, D, generator=gen)
            k, v = (torch.randn(n, KV_HEADS, D, generator=gen) for _ in range(2))
            outs.append(backend.forward(layer, q, k, v, meta))
        if prefill:  # as after a per-head compression: one head holds fewer KVs
            cache.context_lens[1, int(slots[0]), 0] = 3
    return outs, cache


SETTINGS = MetricConfig(window_size=4, collection_buffer=2, pool_kernel=3)
# Another request's: its own window, pooling and (no) buffer, in the same batch.
OTHER_SETTINGS = MetricConfig(window_size=3, collection_buffer=0, pool_kernel=5)


@pytest.mark.parametrize(
    ("kv_dtype", "settings"),
    [
        (torch.float32, [SETTINGS, SETTINGS]),
        (torch.float32, [SETTINGS, OTHER_SETTINGS]),
        (FP8, [SETTINGS, SETTINGS]),
    ],
    ids=["fp32", "fp32-mixed-settings", "fp8"],
)
def test_triton_backend_matches_the_torch_backend(kv_dtype, settings) -> None:
    expected, ref_cache = run(None, kv_dtype, settings)
    got, cache = run(TritonAttentionBackend, kv_dtype, settings)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.metric, ref_cache.metric, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.k_scale, ref_cache.k_scale)
