"""``window``: the paper's accumulated attention metric (the default).

A KV's metric is the attention it received from the prefill's observation window (the last
``w`` queries of the prompt) plus every decode step that collected since, L2 or L1, summed
or averaged (``CompressionParams.metric``).

The "avg" variants divide by the number of queries that actually added to the metric, not
by every query since the KV's position: at prefill only the window's queries count.
"""

from __future__ import annotations

import torch

from kvcompress.compress.scorers.base import ScoreContext


def queries_seen(
    positions: torch.Tensor,  # [...] original positions of the KVs
    seq_lens: torch.Tensor,  # [...] tokens seen, broadcastable to positions
    prefill_lens: torch.Tensor,  # [...] tokens when the last prefill ended
    window_size: torch.Tensor,  # [...] observation window w
    collection_buffer: torch.Tensor,  # [...] b: query-key pairs closer than b do not count
) -> torch.Tensor:
    """Queries that added to each KV's metric (0 for a KV nothing has seen yet).

    Prefill (prompt of ``P`` tokens): the queries of the window ``[P - min(w, P), P)`` at
    distance >= b, i.e. positions ``[max(P - w, p + b), P)``. Then every decode step since
    (positions ``P .. seq_len - 1``) whose query is at distance >= b:
    ``[max(P, p + b), seq_len)``. Assumes every step since the prefill collected, which is
    what the engine does for a sequence that will compress again.
    """
    p = positions.long()
    P = prefill_lens.long()
    start = torch.maximum(P - torch.minimum(window_size.long(), P), p + collection_buffer)
    prefill = (P - start).clamp(min=0)
    decode = (seq_lens.long() - torch.maximum(P, p + collection_buffer)).clamp(min=0)
    return prefill + decode


class WindowScorer:
    name = "window"
    uses_metric = True
    pooled = False
    requires: tuple[str, ...] = ()
    query_agnostic = False
    per_query_head = True

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        cache, view = ctx.cache, ctx.view
        rows = view.blocks.numel()
        metric = view.gather(
            cache.metric, ctx.workspace.get("scores", (rows, cache.block_size), torch.float32)
        )
        averaged = [p.effective_metric.endswith("avg") for p in ctx.params]
        if not any(averaged):
            return metric
        col = (-1, 1, 1)
        prefill = ctx.inputs.prefill_lens
        seen = queries_seen(
            ctx.positions,
            ctx.seq_lens.view(col),
            (ctx.seq_lens if prefill is None else prefill).view(col),
            ctx.window_size.view(col),
            ctx.collection_buffer.view(col),
        )
        mask = torch.tensor(averaged, device=metric.device).view(col)
        return torch.where(mask, metric / seen.clamp(min=1).float(), metric)
