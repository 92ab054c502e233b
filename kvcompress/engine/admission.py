"""Whether a request could ever finish: the checks ``add_request`` and
``add_branched_request`` make before queueing."""

from __future__ import annotations

from kvcompress.compress import CompressionParams
from kvcompress.engine.outputs import Capacity
from kvcompress.errors import KVBudgetError


def blocks_needed_alone(
    capacity: Capacity, params: CompressionParams, prompt_len: int, max_tokens: int
) -> tuple[int, str]:
    """The most blocks one sequence may hold at once, and what they are (for messages).

    At its largest a sequence holds its budget at its final length plus one block per head
    to grow into (compressed between chunks and steps, so the prompt's length does not
    matter); without eviction, every KV; with ``compress_once``, the compressed prompt plus
    everything it generates.
    """
    heads = capacity.heads
    final = min(prompt_len + max_tokens, capacity.max_model_len)
    full = capacity.blocks_for(final)
    if not params.evicts:
        return full, f"{final} tokens uncompressed"
    if params.compress_once:
        need = capacity.blocks_compressed(params, prompt_len)
        need = min(full, need + capacity.blocks_for(max_tokens))
        return need, "its prompt compressed once plus every generated token"
    need = min(full, capacity.blocks_compressed(params, final) + heads)
    return need, f"its budget at {final} tokens plus a block per head"


def check_budget_fits(
    capacity: Capacity,
    params: CompressionParams,
    prompt_len: int,
    max_tokens: int,
    seqs: int = 1,
) -> None:
    """Refuse a request that could not finish even alone in the cache.

    With ``seqs`` forks (n > 1), each may come to hold all of its own blocks (compressions
    copy what they rewrite), but the prompt is shared: the prompt once, and what each
    sequence adds (at least a block per head).
    """
    heads = capacity.heads
    need, what = blocks_needed_alone(capacity, params, prompt_len, max_tokens)
    if seqs > 1:
        shared = min(need, capacity.blocks_for(prompt_len))
        need += (seqs - 1) * max(need - shared, heads)
        what += f", and for {seqs - 1} more sequences what they add to the shared prompt"
    _refuse_beyond(capacity, need, what)


def check_branches_fit(
    capacity: Capacity, branches: list[CompressionParams], prompt_len: int, max_tokens: int
) -> None:
    """Refuse a branched prompt whose branches could not finish even alone in the cache.

    Its prefill holds the whole prompt uncompressed; at the fork each evicting branch
    copies the shared blocks it compacts into (at most what it keeps) before the prompt's
    blocks are released; from then on each branch holds what it would alone.
    """
    prompt = capacity.blocks_for(prompt_len)
    copies = sum(capacity.blocks_compressed(p, prompt_len) for p in branches if p.evicts)
    after = sum(blocks_needed_alone(capacity, p, prompt_len, max_tokens)[0] for p in branches)
    need = max(prompt + copies, after)
    what = (
        f"its {prompt_len}-token prompt uncompressed plus each of its {len(branches)} "
        "branches' compressed copy, or what the branches hold alone"
    )
    _refuse_beyond(capacity, need, what)


def _refuse_beyond(capacity: Capacity, need: int, what: str) -> None:
    if need > capacity.num_blocks:
        raise KVBudgetError(
            f"the request needs {need} KV blocks ({what}, {capacity.heads} heads) but the "
            f"whole KV cache holds {capacity.num_blocks}; raise kv_cache_memory, lower "
            "max_tokens or compress more (compression_rate or max_cache_tokens)",
            param="prompt",
        )
