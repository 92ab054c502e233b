"""Log-probabilities of tokens: of each generated token, and of each prompt token (scoring).

They are the raw model distribution, ``log_softmax`` of the logits the sampler sees, before
temperature, top-k or top-p (vLLM's default "raw logprobs"). Only rows that asked for them
are ever normalised: a step without such a row never calls into this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

# The most alternatives a request may ask for per token (OpenAI's and vLLM's limit).
MAX_LOGPROBS = 20
# Rows normalised at once when scoring a prompt chunk: a chunk of thousands of positions
# times a vocabulary of 10^5 would otherwise take gigabytes of float32 at once.
ROWS_PER_PASS = 256


class TokenLogprob(NamedTuple):
    """One token's log-probability, and the ``k`` most likely tokens at its position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


def token_logprobs(
    logits: torch.Tensor,  # [R, V]
    tokens: torch.Tensor,  # [R] the token each row scores
    ks: list[int],  # alternatives wanted per row
) -> list[TokenLogprob]:
    """The log-probability of ``tokens[r]`` under row ``r``, and the top ``ks[r]``."""
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(1, tokens.view(-1, 1).to(logp.device)).view(-1).tolist()
    ids = tokens.tolist()
    k = min(max(ks, default=0), logp.shape[-1])
    if k == 0:
        return [TokenLogprob(t, lp, []) for t, lp in zip(ids, chosen, strict=True)]
    values, indices = logp.topk(k, dim=-1)  # sorted, most likely first
    values, indices = values.tolist(), indices.tolist()
    return [
        TokenLogprob(t, lp, list(zip(indices[r][: ks[r]], values[r][: ks[r]], strict=True)))
        for r, (t, lp) in enumerate(zip(ids, chosen, strict=True))
    ]


def score_positions(
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,  # [R, H] the hidden state at each position
    targets: torch.Tensor,  # [R] the token that follows each position
    k: int,
) -> list[TokenLogprob]:
    """:func:`token_logprobs` of every position of a prompt chunk, a few rows at a time, so
    no ``[R, vocab]`` tensor of the whole chunk is ever held."""
    out: list[TokenLogprob] = []
    for start in range(0, hidden.shape[0], ROWS_PER_PASS):
        end = start + ROWS_PER_PASS
        logits = compute_logits(hidden[start:end])
        out.extend(token_logprobs(logits, targets[start:end], [k] * logits.shape[0]))
    return out
