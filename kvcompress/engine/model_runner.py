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
    def run(
        self, seqs: list[Sequence], num_tokens: list[int], num_decode: int, sample: list[int]
    ) -> torch.Tensor:
        """Feed ``num_tokens[i]`` tokens of each sequence; logits ``[len(sample), vocab]``
        for the next token of the sequences at the indices ``sample``.

        The first ``num_decode`` sequences decode (their last token); the others feed their
        next ``num_tokens[i]`` uncomputed tokens (a prefill chunk).
        """
        dev = self.device
        # 0: the sequence collects no metric (its policy does not score by it, or it will
        # not compress again), so a batch without collectors takes the fused decode path.
        powers = [seq.compression.power if seq.collects_metric else 0 for seq in seqs]
        slots = [seq.slot for seq in seqs]
        computed = [seq.num_computed for seq in seqs]
        if num_decode == len(seqs):
            last = [seq.last_token for seq in seqs]
            per_seq = torch.tensor([slots, num_tokens, powers, last], dtype=torch.long, device=dev)
            input_ids = per_seq[3]
        else:
            # One host-to-device copy for the per-sequence values.
            per_seq = torch.tensor([slots, num_tokens, powers], dtype=torch.long, device=dev)
            ids = [seq.last_token for seq in seqs[:num_decode]]
            for seq, start, n in zip(
                seqs[num_decode:], computed[num_decode:], num_tokens[num_decode:], strict=True
            ):
                ids.extend(seq.token_slice(start, start + n))
            input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        seq_slots, counts, metric_power = per_seq[0], per_seq[1], per_seq[2]
        plan = self.cache.prepare_append(seq_slots, counts)
        meta = build_metadata(
            self.cache,
            seq_slots=seq_slots,
            append=plan,
            query_lens=num_tokens,
            num_decode=num_decode,
            computed=computed,
            metric_powers=powers,
            metric_power=metric_power,
        )
        hidden = self.model(input_ids, plan.positions, meta)
        if len(sample) != len(seqs) or num_decode != len(seqs):
            ends, total = [], 0
            for n in num_tokens:
                total += n
                ends.append(total - 1)
            hidden = hidden[torch.tensor([ends[i] for i in sample], dtype=torch.long, device=dev)]
        return self.model.compute_logits(hidden)
