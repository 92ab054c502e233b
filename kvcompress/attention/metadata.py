"""Per-step attention metadata: what the tokens of one model forward belong to."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.cache import AppendPlan


@dataclass
class AttentionMetadata:
    """Built by the engine for one step; passed through the model untouched.

    A step is either a prefill (each sequence, holding no KVs yet, contributes its first
    ``query_lens[i]`` tokens) or a decode (each sequence contributes one token).
    """

    is_prefill: bool
    seq_slots: torch.Tensor  # [B] cache rows of the step's sequences
    append: AppendPlan  # where each token's KVs go
    query_lens: list[int]  # tokens per sequence in this step
    metric_power: torch.Tensor  # [B] 1 or 2: exponent for the eviction metric
    collect_metric: list[bool]  # whether each sequence accumulates a metric at all
    # Decode: blocks to gather per head, the most any (layer, head) of the batch holds;
    # computed once per step so that layers do not each wait on the device for it.
    max_blocks: int = 0

    @property
    def any_metric(self) -> bool:
        return any(self.collect_metric)
