"""Per-step attention metadata: what the tokens of one model forward belong to.

Everything here is built once per step (by :func:`build_metadata`) and read by every layer,
so that layers construct no tensors from Python values and never wait on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.cache import AppendPlan, PagedKVCache


@dataclass
class DecodeMetadata:
    """What every layer of a decode step gathers: the same rows of each layer's tables."""

    # [L, B * H * max_blocks] block ids to gather, per layer (0 where a head holds fewer
    # blocks: those slots are masked out by ``lens``).
    blocks: torch.Tensor
    lens: torch.Tensor  # [L, B, H, 1] KVs held by each head, this step's token included
    offsets: torch.Tensor  # [max_blocks * block_size] 0, 1, ...: slot index within a head
    max_blocks: int  # blocks gathered per head: the most any (layer, head) of the batch holds
    # Every (layer, sequence, head) holds this many KVs (None: they differ), so that attention
    # needs no mask: the gathered rows are cut to it instead. Usual without compression.
    uniform_len: int | None = None

    @property
    def width(self) -> int:
        return self.offsets.numel()


@dataclass
class AttentionMetadata:
    """Built by the engine for one step; passed through the model untouched.

    A step is either a prefill (each sequence, holding no KVs yet, contributes its first
    ``query_lens[i]`` tokens) or a decode (each sequence contributes one token).
    """

    is_prefill: bool
    seq_slots: torch.Tensor  # [B] cache rows of the step's sequences
    append: AppendPlan  # where each token's KVs go
    # [L, N * H] the same slots token-major, as a layer's k and v come ([N, H, D]).
    write_slots: torch.Tensor
    query_lens: list[int]  # tokens per sequence in this step
    # [B] exponent for the eviction metric: 1 or 2, and 0 for a sequence that collects none.
    metric_power: torch.Tensor
    metric_powers: list[int]  # the same as Python ints (prefill reads them per sequence)
    any_metric: bool  # some sequence of the step collects the metric
    decode: DecodeMetadata | None = None  # decode steps only

    @property
    def collect_metric(self) -> list[bool]:
        return [p > 0 for p in self.metric_powers]

    @property
    def max_blocks(self) -> int:
        return self.decode.max_blocks if self.decode is not None else 0


def build_metadata(
    cache: PagedKVCache,
    *,
    is_prefill: bool,
    seq_slots: torch.Tensor,
    append: AppendPlan,
    query_lens: list[int],
    metric_powers: list[int],
    metric_power: torch.Tensor | None = None,
) -> AttentionMetadata:
    """The metadata of one step, after ``append`` (the step's :meth:`prepare_append`).

    ``metric_powers[i]`` is 0 for a sequence that collects no metric. ``metric_power``, the
    same values as a tensor on the cache's device, may be passed when the caller already
    built it (one host-to-device copy per step instead of several).
    """
    if metric_power is None:
        metric_power = torch.tensor(metric_powers, dtype=torch.long, device=seq_slots.device)
    decode = None
    if not is_prefill:
        bs = cache.block_size
        # The widest head of the batch, known from the append without waiting on the device.
        max_blocks = max(1, -(-append.max_context_len // bs))
        tables = cache.block_tables[:, seq_slots, :, :max_blocks]  # [L, B, H, nb]
        decode = DecodeMetadata(
            blocks=tables.clamp(min=0).reshape(cache.num_layers, -1),
            lens=cache.context_lens[:, seq_slots].unsqueeze(-1),
            offsets=torch.arange(max_blocks * bs, device=seq_slots.device),
            max_blocks=max_blocks,
            uniform_len=(
                append.max_context_len if append.min_context_len == append.max_context_len else None
            ),
        )
    return AttentionMetadata(
        is_prefill=is_prefill,
        seq_slots=seq_slots,
        append=append,
        write_slots=append.slots.transpose(1, 2).reshape(cache.num_layers, -1),
        query_lens=query_lens,
        metric_power=metric_power,
        metric_powers=metric_powers,
        any_metric=any(p > 0 for p in metric_powers),
        decode=decode,
    )
