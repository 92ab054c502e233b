"""Runs the model for one step: builds the flat token batch and its attention metadata."""

from __future__ import annotations

import torch

from kvcompress.attention import AttentionMetadata
from kvcompress.cache import PagedKVCache
from kvcompress.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, device: torch.device) -> None:
        self.model = model
        self.cache = cache
        self.device = device

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor:
        """Logits ``[len(seqs), vocab]`` for the next token of each sequence."""
        dev = self.device
        if is_prefill:
            tokens = [seq.token_ids for seq in seqs]
        else:
            tokens = [[seq.token_ids[-1]] for seq in seqs]
        counts = [len(t) for t in tokens]
        seq_slots = torch.tensor([seq.slot for seq in seqs], dtype=torch.long, device=dev)
        plan = self.cache.prepare_append(seq_slots, torch.tensor(counts, device=dev))
        input_ids = torch.tensor([t for ts in tokens for t in ts], dtype=torch.long, device=dev)
        collect = [seq.compression.evicts for seq in seqs]
        max_blocks = 0
        if not is_prefill:
            longest = int(self.cache.context_lens[:, seq_slots].max())
            max_blocks = -(-longest // self.cache.block_size)
        meta = AttentionMetadata(
            is_prefill=is_prefill,
            seq_slots=seq_slots,
            append=plan,
            query_lens=counts,
            metric_power=torch.tensor([seq.compression.power for seq in seqs], device=dev),
            collect_metric=collect,
            max_blocks=max_blocks,
        )
        hidden = self.model(input_ids, plan.positions, meta)
        last = torch.cumsum(torch.tensor(counts, device=dev), 0) - 1
        return self.model.compute_logits(hidden[last])
