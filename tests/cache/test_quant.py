"""fp8 KV storage: the round-trip error bound, the scale policy, and the bytes it saves."""

from __future__ import annotations

import pytest
import torch

from kvcompress.cache import FP8, CacheConfig, PagedKVCache, kv_dtype_from_name
from kvcompress.cache.quant import FP8_MAX, HEADROOM, dequantize, first_scale, quantize


def test_fp8_round_trip_is_within_the_documented_bound() -> None:
    gen = torch.Generator().manual_seed(0)
    # Per-head ranges four orders of magnitude apart, and heavy tails within each head.
    x = torch.randn(64, 3, 32, generator=gen) * torch.tensor([1e-2, 1.0, 1e2]).view(1, 3, 1)
    x[0, :, 0] *= 8  # an outlier per head
    scale = first_scale(x)
    back = dequantize(quantize(x, scale).view(-1, 3, 32).transpose(0, 1), scale, torch.float32)
    back = back.transpose(0, 1)
    # Relative 2**-4 (3 mantissa bits, round to nearest); absolute 2**-10 * scale (subnormals).
    bound = torch.maximum(x.abs() * 2**-4, scale.view(1, 3, 1) * 2**-10)
    assert (back - x).abs().le(bound).all()
    # Into a given buffer (whatever it held), the same values.
    stored = quantize(x, scale).view(-1, 3, 32).transpose(0, 1)
    out = torch.full(stored.shape, float("nan"))
    assert dequantize(stored, scale, torch.float32, out=out) is out
    assert torch.equal(out.transpose(0, 1), back)
    # The first write's amax sits HEADROOM below the top of the range.
    amax = x.abs().amax(dim=(0, 2))
    torch.testing.assert_close(amax / scale, torch.full((3,), FP8_MAX / HEADROOM))


def test_values_beyond_the_range_saturate_instead_of_overflowing() -> None:
    scale = torch.ones(1)
    q = quantize(torch.tensor([[[1e6, -1e6]]]), scale)
    assert q.float().tolist() == [[[FP8_MAX, -FP8_MAX]]]


def test_fp8_cache_counts_its_real_bytes_and_holds_more_blocks() -> None:
    shape = dict(num_layers=2, num_kv_heads=2, head_dim=64, kv_cache_memory="1MiB")
    bf16 = CacheConfig(**shape, dtype=torch.bfloat16)
    fp8 = CacheConfig(**shape, dtype=FP8)
    assert bf16.bytes_per_kv == 2 * 64 * 2 + 8
    assert fp8.bytes_per_kv == 2 * 64 * 1 + 8
    assert fp8.num_blocks > bf16.num_blocks
    with pytest.raises(ValueError, match="dtype"):
        CacheConfig(**shape, dtype=torch.int8)


def test_kv_dtype_names() -> None:
    assert kv_dtype_from_name("auto", torch.bfloat16) == torch.bfloat16
    assert kv_dtype_from_name("fp8", torch.bfloat16) == FP8
    assert kv_dtype_from_name("float16", torch.float32) == torch.float16
    with pytest.raises(ValueError, match="unknown KV cache dtype"):
        kv_dtype_from_name("int4", torch.float32)


def test_fp8_cache_scales_are_fixed_by_the_first_write() -> None:
    cache = PagedKVCache(
        CacheConfig(num_layers=1, num_kv_heads=2, head_dim=8, kv_cache_memory="64KiB", dtype=FP8)
    )
    slot = cache.allocate_seq()
    plan = cache.prepare_append(torch.tensor([slot]), torch.tensor([6]))
    k = torch.randn(6, 2, 8)
    cache.write(0, plan.slots[0][:, :3], k[:3], k[:3])
    first = cache.k_scale.clone()
    cache.write(0, plan.slots[0][:, 3:], k[3:] * 100, k[3:] * 100)  # larger: saturates
    assert torch.equal(cache.k_scale, first)
    with pytest.raises(ValueError, match="layer"):
        cache.write_tokens(plan.slots[0].transpose(0, 1).reshape(-1), k, k)
    # The stored KVs read back within the bound (through the pool's own dequantisation).
    rows = cache.k_pool.view(-1, 8)[plan.slots[0][:, :3].reshape(-1)].view(2, 3, 8)
    back = cache.dequantize(0, rows, "k", torch.float32)
    expected = k[:3].transpose(0, 1)
    bound = torch.maximum(expected.abs() * 2**-4, first.view(2, 1, 1) * 2**-10)
    assert (back - expected).abs().le(bound).all()


def test_compaction_moves_fp8_kvs() -> None:
    """Compaction copies fp8 pools as bytes (the CPU build has no fp8 index_copy_)."""
    from kvcompress.compress import CompressionParams, Compressor

    cache = PagedKVCache(
        CacheConfig(
            num_layers=1, num_kv_heads=1, head_dim=8, kv_cache_memory="64KiB", dtype=FP8,
            block_size=2,
        )
    )  # fmt: skip
    slot = cache.allocate_seq()
    plan = cache.prepare_append(torch.tensor([slot]), torch.tensor([16]))
    k = torch.randn(16, 1, 8)
    cache.write(0, plan.slots[0], k, k)
    cache.metric.view(-1)[plan.slots[0].reshape(-1)] = torch.arange(16.0)  # evict the oldest
    params = CompressionParams(compression_rate=2.0, protected_window=0, min_cache_tokens=0)
    Compressor(cache).compress([slot], [params])
    n = int(cache.context_lens[0, slot, 0])
    assert n < 16
    rows = cache.k_pool.view(-1, 8)[
        (cache.block_tables[0, slot, 0, : n // 2].view(-1, 1) * 2 + torch.arange(2)).view(-1)
    ]
    kept = cache.position.view(-1)[
        (cache.block_tables[0, slot, 0, : n // 2].view(-1, 1) * 2 + torch.arange(2)).view(-1)
    ].long()
    # Each surviving slot holds the KV of the position it records.
    stored = cache.dequantize(0, rows.view(1, n, 8), "k", torch.float32)[0]
    torch.testing.assert_close(stored, k[kept, 0], atol=0.1, rtol=2**-4)
