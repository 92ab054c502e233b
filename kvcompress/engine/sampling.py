"""Sampling parameters and a batched sampler."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvcompress.engine.logprobs import MAX_LOGPROBS
from kvcompress.errors import InvalidParameterError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Log-probabilities with each generated token, and this many alternatives (0: none).
    logprobs: int | None = None
    # Log-probabilities of the prompt's tokens (the first has none), delivered once the
    # prefill completes. With them, max_tokens may be 0: the request only scores its prompt.
    prompt_logprobs: int | None = None
    # Choices returned, and sequences sampled to choose them from (None: n). The prompt is
    # prefilled once; the request then forks into ``best_of`` sequences sharing its KV
    # blocks, and the ``n`` with the highest cumulative logprob are returned.
    n: int = 1
    best_of: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            is_int = isinstance(value, int) and not isinstance(value, bool)
            if value is not None and not (is_int and 0 <= value <= MAX_LOGPROBS):
                raise InvalidParameterError(
                    f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}", param=name
                )
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise InvalidParameterError(f"n must be an integer >= 1, got {self.n!r}", param="n")
        best_of = self.best_of
        if best_of is not None and (
            not isinstance(best_of, int) or isinstance(best_of, bool) or best_of < self.n
        ):
            raise InvalidParameterError(
                f"best_of must be an integer >= n ({self.n}), got {best_of!r}", param="best_of"
            )
        least = 0 if self.prompt_logprobs is not None else 1
        if not isinstance(self.max_tokens, int) or self.max_tokens < least:
            why = " (0 only to score a prompt, with prompt_logprobs)" if least else ""
            raise InvalidParameterError(
                f"max_tokens must be an integer >= {least}{why}, got {self.max_tokens!r}",
                param="max_tokens",
            )
        if not (isinstance(self.temperature, int | float) and 0 <= self.temperature <= 2):
            raise InvalidParameterError(
                f"temperature must be in [0, 2], got {self.temperature!r}", param="temperature"
            )
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidParameterError(
                f"top_k must be an integer >= 0, got {self.top_k!r}", param="top_k"
            )
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise InvalidParameterError(
                f"top_p must be in (0, 1], got {self.top_p!r}", param="top_p"
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidParameterError("stop strings must be non-empty strings", param="stop")

    @property
    def num_seqs(self) -> int:
        """Sequences the request samples: ``best_of``, else ``n``."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def ranks(self) -> bool:
        """Whether the returned choices are picked by cumulative logprob (best_of > n)."""
        return self.num_seqs > self.n

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class Sampler:
    """Samples one token per row; greedy rows take the argmax.

    Random rows use the exponential-race form of categorical sampling (argmax of p / E with
    E ~ Exp(1)), so one noise tensor serves the whole batch; rows with a seed draw their
    noise from their own generator and so do not depend on the rest of the batch.
    """

    seed: int = 0
    _generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)

    def __call__(
        self,
        logits: torch.Tensor,  # [B, V]
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> torch.Tensor:
        logits = logits.float()
        greedy = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            return greedy
        B, V = logits.shape
        temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params])
        scaled = logits / temps.to(logits.device).view(B, 1)
        top_k = [p.top_k for p in params]
        if any(k > 0 for k in top_k):
            k_max = max(top_k)
            kth = torch.topk(scaled, min(k_max, V), dim=-1).values
            ks = torch.tensor([min(k, V) if k > 0 else V for k in top_k], device=logits.device)
            threshold = kth.gather(1, (ks.clamp(max=kth.shape[1]) - 1).view(B, 1))
            threshold = torch.where(ks.view(B, 1) >= V, -math.inf, threshold)
            scaled = scaled.masked_fill(scaled < threshold, -math.inf)
        probs = torch.softmax(scaled, dim=-1)
        top_p = torch.tensor([p.top_p for p in params], device=logits.device)
        if bool((top_p < 1).any()):
            sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            drop = before >= top_p.view(B, 1)
            probs = probs.scatter(1, order, sorted_probs.masked_fill(drop, 0.0))
        noise = torch.empty_like(probs).exponential_(generator=self._generator)
        for row, gen in enumerate(generators):
            if gen is not None:
                noise[row] = torch.empty(V).exponential_(generator=gen).to(noise.device)
        sampled = (probs / noise).argmax(dim=-1)
        is_greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        return torch.where(is_greedy, greedy, sampled)
