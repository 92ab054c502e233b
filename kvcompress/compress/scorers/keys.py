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
    if cache.quantized:
        return dequantize(keys, cache.k_scale.view(-1), torch.float32)
    return keys.float()


def query_rows(queries: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[S, L, Hq, D] -> [S, L * Hkv, G, D]``: each KV head's GQA group of query heads
    (query head ``h`` reads KV head ``h // G``), on the compressor's (layer, head) rows."""
    S, L, Hq, D = queries.shape
    return queries.float().reshape(S, L * num_kv_heads, Hq // num_kv_heads, D)
