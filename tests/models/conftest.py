"""Shared helpers for the model tests: a dense attention backend and greedy decoding."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kvcompress.models import LlamaForCausalLM


class DenseCausalBackend:
    """Reference attention for ONE sequence given whole: causal SDPA, no cache.

    KV head ``j`` serves query heads ``j * g .. (j + 1) * g - 1`` (the grouping of
    transformers' ``repeat_kv``), hence ``repeat_interleave`` on the head axis.
    """

    def __init__(self) -> None:
        self.calls: list[int] = []

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: Any
    ) -> torch.Tensor:
        self.calls.append(layer)
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        # [N, H, D] -> [H, N, D] for SDPA, and back.
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True
        )
        return out.transpose(0, 1)


def full_logits(model: LlamaForCausalLM, ids: list[int] | torch.Tensor) -> torch.Tensor:
    """Logits ``[N, vocab]`` for every position of one sequence."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    with torch.inference_mode():
        hidden = model(ids, torch.arange(ids.numel()), meta=None)
        return model.compute_logits(hidden)


def greedy(model: LlamaForCausalLM, ids: list[int], steps: int, stop: set[int]) -> list[int]:
    """Greedy continuation, recomputing the whole sequence each step (no cache needed)."""
    out: list[int] = []
    for _ in range(steps):
        seq = torch.tensor(ids + out)
        with torch.inference_mode():
            hidden = model(seq, torch.arange(seq.numel()), meta=None)
            nxt = int(model.compute_logits(hidden[-1:])[0].argmax())
        out.append(nxt)
        if nxt in stop:
            break
    return out


@pytest.fixture
def dense_backend() -> DenseCausalBackend:
    return DenseCausalBackend()


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One converted-model cache for the whole session, never the user's own."""
    return tmp_path_factory.mktemp("kvcompress-cache")
