"""Keys of every held KV, read through the block tables (shared by the key-based scorers)."""

from __future__ import annotations

import torch

from kvcompress.cache.quant import dequantize
from kvcompress.compress.scorers.base import ScoreContext


def gather_keys(ctx: ScoreContext) -> torch.Tensor:
    """``[S, LH, width, head_dim]`` float32 keys (post-RoPE, as stored; an fp8 cache's
    scaled back by each (layer, head)'s scale, the rows' order)."""
    cache, view = ctx.cache, ctx.view
    # Into a reused buffer, as the metric and positions are: a fresh one of this size
    # page-faults on every pass, which cost more than the copy itself.
    shape = (view.blocks.numel(), *cache.k_pool.shape[1:])
    keys = view.gather(cache.k_pool, ctx.workspace.get("keys", shape, cache.k_pool.dtype))
    if keys.dtype == torch.float32:
        return keys
    # A narrower pool's keys are widened into a reused buffer too: a fresh float32 copy made
    # a bfloat16 pool's pass twice as slow as a float32 one's, an fp8 pool's four times.
    wide = ctx.workspace.get("keys_float32", keys.shape, torch.float32)
    if cache.quantized:
        return dequantize(keys, cache.k_scale.view(-1), torch.float32, out=wide)
    return wide.copy_(keys)


def query_rows(queries: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[S, L, Hq, D] -> [S, L * Hkv, G, D]``: each KV head's GQA group of query heads
    (query head ``h`` reads KV head ``h // G``), on the compressor's (layer, head) rows."""
    S, L, Hq, D = queries.shape
    return queries.float().reshape(S, L * num_kv_heads, Hq // num_kv_heads, D)
