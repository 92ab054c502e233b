"""``expected-attention``: the attention future queries are expected to pay, in closed form.

After kvpress's ExpectedAttentionPress (Devoto, Jeblick, Jegou, arXiv 2510.00636): model the
next queries as Gaussian ``q ~ N(mu, diag(var))``; then ``E[exp(s q.k)] = exp(s mu.k +
s^2/2 sum(var * k^2))``, so the expected attention of KV ``i`` is the softmax of those
logits over the head's held KVs, max-pooled along positions and summed over the GQA group.
It needs no query of the question, only statistics of the context's last queries, so a
document can be compressed before its question arrives.

Query statistics (``ScorerInputs.query_mean``, optionally ``query_var``, post-RoPE,
``[S, L, Hq, D]``): the engine gives the mean of each sequence's latest observation window
carried to the positions to come (``engine.window_queries``: taken before RoPE, rotated by
the rotation averaged over the next positions) and no variance, which cost the pass key in
most RULER prompts when given (``docs/quality.md``); a caller may pass one. Without a mean
the compressor refuses the request (``InvalidParameterError``): a stand-in built from the
keys alone (a head's recent mean key as its query) scored 0 on every RULER cell.

One mean query spreads its attention over far more KVs than the window's real queries do,
and how far differs by head: as probabilities, the heads' scores are not on one scale, and
the global selection of ``kvcompress`` kept the wrong heads' KVs (0 to 12.5 on
``niah_single``). The scores are therefore the log of that expected attention standardised
per head (``(s - mean) / std`` over the KVs it holds, as ``key-norm`` does): how far a KV
stands out in its own head. Per-head budgets rank each head alike either way.
"""

from __future__ import annotations

import torch

from kvcompress.compress.scorers.attention import Pooling, group_attention
from kvcompress.compress.scorers.base import ScoreContext
from kvcompress.compress.scorers.keys import gather_keys, query_rows
from kvcompress.compress.scorers.standardize import standardize_per_head


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
    logits = torch.matmul(mean.float() * scale, keys.transpose(-1, -2))  # [S, LH, G, W]
    if var is not None:
        spread = var.float() * (0.5 * scale**2)
        logits += torch.matmul(spread, (keys * keys).transpose(-1, -2))
    return group_attention(logits, valid, pooling)


class ExpectedAttentionScorer:
    name = "expected-attention"
    uses_metric = False
    pooled = True
    requires: tuple[str, ...] = ("query_mean",)
    query_agnostic = True
    # Its group sums are merged over a KV head's replicas here, before the standardisation
    # (which does not add up across replicas), not by the compressor.
    per_query_head = False

    def scores(self, ctx: ScoreContext) -> torch.Tensor:
        inputs = ctx.inputs
        assert inputs.query_mean is not None, "the compressor checks `requires` first"
        H = ctx.cache.num_kv_heads
        mean = query_rows(inputs.query_mean, H)
        var = None if inputs.query_var is None else query_rows(inputs.query_var, H)
        valid = ctx.view.valid()
        probs = expected_attention(mean, var, gather_keys(ctx), valid, ctx.scale, ctx.pooling)
        probs = ctx.exchange.merge_replicas(probs)
        log_probs = torch.log(probs.clamp(min=torch.finfo(torch.float32).tiny))
        return standardize_per_head(log_probs, valid)
