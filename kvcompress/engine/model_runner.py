"""Runs the model for one step: builds the flat token batch and its attention metadata."""

from __future__ import annotations

import torch

from kvcompress.attention.metadata import build_metadata
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
        B = len(seqs)
        # 0: the sequence collects no metric (its policy does not score by it, or it will
        # not compress again), so a batch without collectors takes the fused decode path.
        powers = [seq.compression.power if seq.collects_metric else 0 for seq in seqs]
        slots = [seq.slot for seq in seqs]
        if is_prefill:
            prompts = [seq.token_ids for seq in seqs]
            counts = [len(t) for t in prompts]
            # One host-to-device copy for the per-sequence values.
            per_seq = torch.tensor([slots, counts, powers], dtype=torch.long, device=dev)
            input_ids = torch.tensor(
                [t for ts in prompts for t in ts], dtype=torch.long, device=dev
            )
        else:
            counts = [1] * B
            last = [seq.last_token for seq in seqs]
            per_seq = torch.tensor([slots, counts, powers, last], dtype=torch.long, device=dev)
            input_ids = per_seq[3]
        seq_slots, num_tokens, metric_power = per_seq[0], per_seq[1], per_seq[2]
        plan = self.cache.prepare_append(seq_slots, num_tokens)
        meta = build_metadata(
            self.cache,
            is_prefill=is_prefill,
            seq_slots=seq_slots,
            append=plan,
            query_lens=counts,
            metric_powers=powers,
            metric_power=metric_power,
        )
        hidden = self.model(input_ids, plan.positions, meta)
        if is_prefill:
            ends, total = [], 0
            for n in counts:
                total += n
                ends.append(total - 1)
            hidden = hidden[torch.tensor(ends, device=dev)]
        return self.model.compute_logits(hidden)
