"""The interface between a model's attention layers and the KV cache.

Models work on a flat token layout (no batch dimension, as in vLLM): a step carries ``N``
tokens from one or more sequences. A model calls its backend once per layer with queries,
keys and values *after* rotary embedding; the backend stores the keys and values, attends,
and returns the attention output. What the tokens belong to (sequences, cache slots,
observation windows) travels in ``meta``, an object the backend defines and the engine
builds; the model passes it through untouched, so models know nothing of the engine.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class AttentionBackend(Protocol):
    def forward(
        self,
        layer: int,
        q: torch.Tensor,  # [N, num_q_heads, head_dim]
        k: torch.Tensor,  # [N, num_kv_heads, head_dim]
        v: torch.Tensor,  # [N, num_kv_heads, head_dim]
        meta: Any,
    ) -> torch.Tensor:  # [N, num_q_heads, head_dim]
        ...
