"""Runs the model for one step: builds the flat token batch and its attention metadata."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import NamedTuple

import torch

from kvcompress.attention.metadata import build_metadata
from kvcompress.cache import PagedKVCache
from kvcompress.compress import MetricConfig
from kvcompress.engine.cuda_graphs import DecodeGraphs
from kvcompress.engine.kept_queries import KeptQueries
from kvcompress.engine.last_queries import LastQueries
from kvcompress.engine.logprobs import TokenLogprob, score_positions
from kvcompress.engine.sequence import Sequence
from kvcompress.engine.token_spans import TokenSpans
from kvcompress.engine.window_queries import WindowQueries
from kvcompress.errors import InvalidParameterError


class RunnerOutput(NamedTuple):
    logits: torch.Tensor  # [len(sample), vocab]: the next token of the sampled sequences
    # Batch index -> the logprob of the next prompt token at each position of its chunk
    # (the sequences ``run`` was asked to score; none past the prompt's last token).
    prompt_logprobs: dict[int, list[TokenLogprob]]


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        cache: PagedKVCache,
        device: torch.device,
        metric: MetricConfig | None = None,
        token_spans: TokenSpans | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        # How sequences collect the metric unless their request says otherwise.
        self.metric = metric or MetricConfig()
        # The tokenizer's spans, for sequences whose metric is pooled over them; None: a
        # runner without a tokenizer, which refuses them.
        self.token_spans = token_spans
        mc = model.config
        # The query heads this model computes: a tensor-parallel shard's own.
        heads = len(model.shard.layout.q_heads)
        shape = (cache.config.max_seqs, mc.num_layers, heads, mc.head_dim)
        self.kept_queries = KeptQueries(
            LastQueries(*shape, device), WindowQueries(*shape, device, model.rotary)
        )
        # Captured decode steps (CUDA graphs), set by the engine when it uses them.
        self.graphs: DecodeGraphs | None = None

    @torch.inference_mode()
    def run(
        self,
        seqs: list[Sequence],
        num_tokens: list[int],
        num_decode: int,
        sample: list[int],
        prompt_logprobs: Mapping[int, int] | None = None,
    ) -> RunnerOutput:
        """Feed ``num_tokens[i]`` tokens of each sequence; logits ``[len(sample), vocab]``
        for the next token of the sequences at the indices ``sample``.

        The first ``num_decode`` sequences decode (their last token); the others feed their
        next ``num_tokens[i]`` uncomputed tokens (a prefill chunk). ``prompt_logprobs`` maps
        the index of a chunk to score to its top-k: the logprob of each next prompt token
        is computed from this very forward pass, and only for those chunks.
        """
        dev = self.device
        # 0: the sequence collects no metric (its policy does not score by it, or it will
        # not compress again), so a batch without collectors takes the fused decode path.
        powers = [seq.compression.power if seq.collects_metric else 0 for seq in seqs]
        settings = [seq.compression.metric_settings(self.metric) for seq in seqs]
        buffers = [m.collection_buffer for m in settings]
        slots = [seq.slot for seq in seqs]
        computed = [seq.num_computed for seq in seqs]
        # Flat index of each sequence's last token of the step.
        ends = list(itertools.accumulate(num_tokens, initial=-1))[1:]
        # One host-to-device copy for the per-sequence values.
        values = [slots, num_tokens, powers, buffers]
        if num_decode == len(seqs):
            per_seq = torch.tensor(
                [*values, [seq.last_token for seq in seqs]], dtype=torch.long, device=dev
            )
            input_ids = per_seq[4]
        else:
            per_seq = torch.tensor(values, dtype=torch.long, device=dev)
            ids = [seq.last_token for seq in seqs[:num_decode]]
            for seq, start, n in zip(
                seqs[num_decode:], computed[num_decode:], num_tokens[num_decode:], strict=True
            ):
                ids.extend(seq.token_slice(start, start + n))
            input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        seq_slots, counts, metric_power, collection_buffer = per_seq[:4]
        plan = self.cache.prepare_append(seq_slots, counts)
        keep = [i for i, seq in enumerate(seqs) if seq.keeps_last_query]
        if self._replays(len(seqs), num_decode, keep, prompt_logprobs):
            assert self.graphs is not None
            logits = self.graphs.run(per_seq, input_ids, plan, any(powers))
            if len(sample) != len(seqs):
                logits = logits[torch.tensor(sample, dtype=torch.long, device=dev)]
            return RunnerOutput(logits, {})
        capture = self.kept_queries.newest.capture(
            [ends[i] for i in keep], [slots[i] for i in keep]
        )
        # A chunk's window: its last w tokens (all of them when it is shorter).
        window = [i for i in range(num_decode, len(seqs)) if seqs[i].keeps_window_queries]
        window_capture = self.kept_queries.windows.capture(
            [
                range(ends[i] + 1 - min(settings[i].window_size, num_tokens[i]), ends[i] + 1)
                for i in window
            ],
            [slots[i] for i in window],
            plan.positions,
        )
        meta = build_metadata(
            self.cache,
            seq_slots=seq_slots,
            append=plan,
            query_lens=num_tokens,
            num_decode=num_decode,
            computed=computed,
            metric_powers=powers,
            metric_settings=settings,
            metric_power=metric_power,
            collection_buffer=collection_buffer,
            capture=capture,
            window_capture=window_capture,
            spans=[
                self._chunk_spans(seq, start + n) if i >= num_decode else None
                for i, (seq, start, n) in enumerate(zip(seqs, computed, num_tokens, strict=True))
            ],
        )
        hidden = self.model(input_ids, plan.positions, meta)
        self.kept_queries.windows.finish()
        scored = self._score_prompts(seqs, num_tokens, computed, hidden, prompt_logprobs or {})
        if len(sample) != len(seqs) or num_decode != len(seqs):
            hidden = hidden[torch.tensor([ends[i] for i in sample], dtype=torch.long, device=dev)]
        return RunnerOutput(self.model.compute_logits(hidden), scored)

    def pools_spans(self, seq: Sequence) -> bool:
        """Whether ``seq``'s prefill metric is pooled over spans of its tokens."""
        return seq.collects_metric and seq.compression.metric_settings(self.metric).pool_spans

    def _chunk_spans(self, seq: Sequence, end: int) -> torch.Tensor | None:
        """The span start of each of ``seq``'s positions before ``end`` (the end of its
        chunk), for a sequence that pools its metric over spans."""
        if not self.pools_spans(seq):
            return None
        if self.token_spans is None:
            raise InvalidParameterError(
                "pool_spans needs the model's tokenizer, which this runner was not given",
                param="pool_spans",
            )
        return self.token_spans.span_starts(seq.token_slice(0, end)).to(self.device)

    def _replays(
        self, batch: int, num_decode: int, keep: list[int], score: Mapping[int, int] | None
    ) -> bool:
        """Whether the step is a captured decode step: decodes only, no query kept, no
        prompt scored, and a batch a graph holds."""
        return (
            self.graphs is not None
            and num_decode == batch
            and not keep
            and not score
            and self.graphs.bucket(batch) is not None
        )

    def _score_prompts(
        self,
        seqs: list[Sequence],
        num_tokens: list[int],
        computed: list[int],
        hidden: torch.Tensor,  # [tokens of the step, H]
        score: Mapping[int, int],
    ) -> dict[int, list[TokenLogprob]]:
        if not score:
            return {}
        offsets = [0]
        for n in num_tokens:
            offsets.append(offsets[-1] + n)
        out = {}
        for i, k in score.items():
            seq, start = seqs[i], computed[i]
            # Position p predicts token p + 1: the prompt's last position predicts the first
            # generated token, which is the sampler's business.
            m = min(num_tokens[i], len(seq.prompt_token_ids) - 1 - start)
            ids = seq.token_slice(start + 1, start + 1 + m)
            targets = torch.tensor(ids, dtype=torch.long, device=self.device)
            rows = hidden[offsets[i] : offsets[i] + m]
            out[i] = score_positions(self.model.compute_logits, rows, targets, k)
        return out
