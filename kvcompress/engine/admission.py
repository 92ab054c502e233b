"""Whether a request could ever finish: the check ``add_request`` makes before queueing."""

from __future__ import annotations

from kvcompress.compress import CompressionParams
from kvcompress.compress.budget import blocks_after_compression
from kvcompress.engine.outputs import Capacity
from kvcompress.errors import KVBudgetError


def check_budget_fits(
    capacity: Capacity,
    params: CompressionParams,
    prompt_len: int,
    max_tokens: int,
    seqs: int = 1,
) -> None:
    """Refuse a request that could not finish even alone in the cache.

    What it must hold at its largest: its budget at its final length plus one block per
    head to grow into (compressed between chunks and steps, so the prompt's length does
    not matter); without eviction, every KV; with ``compress_once``, the compressed
    prompt plus everything it generates. With ``seqs`` forks (n > 1), each may come to
    hold all of its own blocks (compressions copy what they rewrite), but the prompt
    is shared: the prompt once, and what each sequence adds (at least a block per head).
    """
    heads, bs = capacity.heads, capacity.block_size
    final = min(prompt_len + max_tokens, capacity.max_model_len)
    full = capacity.blocks_for(final)
    if not params.evicts:
        need, what = full, f"{final} tokens uncompressed"
    elif params.compress_once:
        need = blocks_after_compression(params, prompt_len, heads, bs)
        need = min(full, need + capacity.blocks_for(max_tokens))
        what = "its prompt compressed once plus every generated token"
    else:
        need = min(full, blocks_after_compression(params, final, heads, bs) + heads)
        what = f"its budget at {final} tokens plus a block per head"
    if seqs > 1:
        shared = min(need, capacity.blocks_for(prompt_len))
        need += (seqs - 1) * max(need - shared, heads)
        what += f", and for {seqs - 1} more sequences what they add to the shared prompt"
    if need > capacity.num_blocks:
        raise KVBudgetError(
            f"the request needs {need} KV blocks ({what}, {heads} heads) but the whole KV "
            f"cache holds {capacity.num_blocks}; raise kv_cache_memory, lower max_tokens "
            "or compress more (compression_rate or max_cache_tokens)",
            param="prompt",
        )
