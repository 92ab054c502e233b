"""``expected-attention``: the attention future queries are expected to pay, in closed form.

After kvpress's ExpectedAttentionPress (Devoto, Jeblick, Jegou, arXiv 2510.00636): model the
next queries as Gaussian ``q ~ N(mu, diag(var))``; then ``E[exp(s q.k)] = exp(s mu.k +
s^2/2 sum(var * k^2))``, so the expected attention of KV ``i`` is the softmax of those
logits over the head's held KVs, summed over the GQA group. It reads no query of the
question, so a document can be compressed before its question arrives.

Query statistics. The engine does not store queries. Given ``ScorerInputs.query_mean`` /
``query_var`` (post-RoPE, ``[S, L, Hq, D]``: e.g. mean and variance of the prefill's
observation-window queries, which the attention backend holds when it computes the window
metric), they are used as is. Without them this scorer falls back to a PROXY, and says so
here rather than pretending: the mean and variance of the head's own most recent ``w`` keys
(``w`` = the metric window) stand in for the query distribution. That proxy ranks KVs by how
well they align with the recent context's keys; it is a heuristic, not the paper's method.
"""

from __future__ import annotations

import torch

from kvcompress.compress.scorers.attention import Pooling, group_attention
from kvcompress.compress.scorers.base import ScoreContext
from kvcompress.compress.scorers.keys import gather_keys, query_rows


def expected_attention(
    mean: torch.Tensor,  # [S, LH, G, D] query mean per query head of each KV head's group
    var: torch.Tensor | None,  # [S, LH, G, D] query variance (None: a point estimate)
    keys: torch.Tensor,  # [S, LH, W, D]
    valid: torch.Tensor,  # [S, LH, W] bool
    scale: float,
    pooling: Pooling | None = None,
) -> torch.Tensor:
    """``[S, LH, W]``: expected attention probability of each KV, max-pooled along
    positions if ``pooling`` says so (0 on padding)."""
    keys = keys.float()
    logits = torch.matmul(mean.float(), keys.transpose(-1, -2)) * scale  # [S, LH, G, W]
    if var is not None:
        spread = torch.matmul(var.float(), (keys * keys).transpose(-1, -2))
        logits = logits + 0.5 * scale**2 * spread
    return group_attention(logits, valid, pooling)


def recent_key_stats(
    keys: torch.Tensor,  # [S, LH, W, D]
    recent: torch.Tensor,  # [S, LH, W] bool: the slots whose keys stand in for queries
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance ``[S, LH, 1, D]`` of each head's recent keys (the proxy)."""
    weight = recent.unsqueeze(-1).float()
    count = weight.sum(dim=2, keepdim=True).clamp(min=1)
    mean = (keys * weight).sum(dim=2, keepdim=True) / count
    var = (((keys - mean) ** 2) * weight).sum(dim=2, keepdim=True) / count
    return mean, var


class ExpectedAttentionScorer:
    name = "expected-attention"
    uses_metric = False
    requires: tuple[str, ...] = ()
    query_agnostic = True

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        keys = gather_keys(ctx)
        valid = ctx.view.valid()
        inputs = ctx.inputs
        if inputs.query_mean is not None:
            H = ctx.cache.num_kv_heads
            mean = query_rows(inputs.query_mean, H)
            var = None if inputs.query_var is None else query_rows(inputs.query_var, H)
        else:
            since = (ctx.seq_lens - ctx.window_size).view(-1, 1, 1)
            mean, var = recent_key_stats(keys, valid & (ctx.positions >= since))
        return expected_attention(mean, var, keys, valid, ctx.scale, ctx.pooling)
