"""Per-step attention metadata: what the tokens of one model forward belong to.

A step mixes decodes and prefill chunks (as vLLM's chunked prefill does). Its flat tokens
are ordered decode sequences first, one token each, then the chunks, each a run of
consecutive tokens of one sequence. A chunk of a sequence that already holds KVs (an earlier
chunk, possibly compressed since) attends to them through its block tables and to itself.

Each sequence carries its own metric-collection settings (metric power, observation window,
pooling kernel, collection buffer), so one step may mix requests that collect differently.

Everything here is built once per step (by :func:`build_metadata`) and read by every layer,
so that layers construct no tensors from Python values and never wait on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvcompress.cache import AppendPlan, PagedKVCache
from kvcompress.compress import MetricConfig


@dataclass
class DecodeMetadata:
    """What every layer of a step gathers for its decode rows: the same rows of each
    layer's tables."""

    # [L, B, H, max_blocks] block ids to gather (0 where a head holds fewer blocks: those
    # slots are masked out by ``lens``); layer ``l`` gathers the first ``layer_blocks[l]``.
    blocks: torch.Tensor
    lens: torch.Tensor  # [L, B, H, 1] KVs held by each head, this step's token included
    offsets: torch.Tensor  # [max_blocks * block_size] 0, 1, ...: slot index within a head
    max_blocks: int  # the most blocks any (layer, head) of the batch holds
    # Blocks gathered per head at each layer: the most any head of the batch holds there.
    # Heads keep different numbers of KVs and layers differ most (12 sequences at rate 8:
    # the widest layer 29 blocks, the mean layer 18), so each layer reads its own width.
    layer_blocks: tuple[int, ...]
    positions: torch.Tensor  # [B] position of each decode token
    metric_power: torch.Tensor  # [B] 1 or 2, and 0 for a sequence that collects no metric
    any_metric: bool  # some decode sequence collects the metric
    collection_buffer: torch.Tensor  # [B] long: each sequence's collection buffer
    any_buffer: bool  # some decode sequence that collects has a buffer > 0
    # Every (layer, sequence, head) holds this many KVs (None: they differ), so that attention
    # needs no mask: the gathered rows are cut to it instead. Usual without compression.
    uniform_len: int | None = None

    def layer_block_ids(self, layer: int) -> torch.Tensor:
        """``[B * H * layer_blocks[layer]]``: the block ids layer ``layer`` gathers."""
        return self.blocks[layer, :, :, : self.layer_blocks[layer]].reshape(-1)

    def layer_offsets(self, layer: int) -> torch.Tensor:
        """``[width]`` slot indices within a head at layer ``layer``."""
        return self.offsets[: self.layer_blocks[layer] * self.block_size]

    @property
    def block_size(self) -> int:
        return self.offsets.numel() // self.max_blocks


@dataclass
class HistoryMetadata:
    """A chunk's view of the KVs its sequence held before the step, per layer.

    The chunk's new KVs are appended after them in every head's table, so slot ``j`` of
    head ``h`` is visible to the chunk's ``i``-th token iff ``j <= old_lens[h] + i``.
    """

    blocks: torch.Tensor  # [L, H * max_blocks] block ids (0 past a head's blocks)
    old_lens: torch.Tensor  # [L, H, 1, 1] KVs each head held before this chunk
    offsets: torch.Tensor  # [max_blocks * block_size] slot index within a head
    query_offsets: torch.Tensor  # [n, 1] 0 .. n-1: each token's index in the chunk
    max_blocks: int

    @property
    def width(self) -> int:
        return self.offsets.numel()


@dataclass
class ChunkMetadata:
    """One sequence's prefill chunk: flat tokens ``start:end``."""

    index: int  # the sequence's index in the step (into ``seq_slots``)
    start: int
    end: int
    metric_power: int  # 1 or 2; 0 when the sequence collects no metric
    metric: MetricConfig  # how the sequence collects it: window, pooling, buffer
    history: HistoryMetadata | None  # None: the sequence held no KVs before this chunk
    # [end position] long: the span start of each of the sequence's positions up to the
    # chunk's last (``metric.pool_spans``); None: the metric is not pooled over spans.
    spans: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass
class QueryCapture:
    """Queries the backend keeps for the engine's scorers: the post-RoPE query of some of
    the step's tokens, per layer (the newest token of a sequence whose scorer reads it, or
    the rows of a prefill chunk's observation window)."""

    rows: torch.Tensor  # [R] flat token indices of the step
    slots: torch.Tensor  # [R] rows of ``store`` they go to
    # [rows, L, Hq, D]: one row per cache sequence slot (the newest queries) or per
    # captured token (a step's window buffer)
    store: torch.Tensor

    def keep(self, layer: int, q: torch.Tensor) -> None:
        """One indexed copy per layer, of the captured rows only."""
        self.store[self.slots, layer] = q[self.rows].to(self.store.dtype)


@dataclass
class AttentionMetadata:
    """Built by the engine for one step; passed through the model untouched."""

    seq_slots: torch.Tensor  # [B] cache rows of the step's sequences
    append: AppendPlan  # where each token's KVs go
    # [L, N * H] the same slots token-major, as a layer's k and v come ([N, H, D]).
    write_slots: torch.Tensor
    query_lens: list[int]  # tokens per sequence in this step
    num_decode: int  # the first ``num_decode`` sequences (and tokens) decode
    decode: DecodeMetadata | None  # None when the step has no decode rows
    chunks: list[ChunkMetadata]  # the prefill chunks, in flat order
    capture: QueryCapture | None = None  # None: no sequence of the step needs its query
    # The queries of some prefill chunks' observation windows (None: no sequence of the step
    # needs them), which the engine turns into statistics after the step.
    window_capture: QueryCapture | None = None

    @property
    def fresh_only(self) -> bool:
        """Only chunks of sequences that held nothing before: plain causal attention."""
        return self.num_decode == 0 and all(c.history is None for c in self.chunks)


def captured_decode_metadata(
    cache: PagedKVCache,
    *,
    seq_slots: torch.Tensor,  # [B]
    write_slots: torch.Tensor,  # [L, B * H] token-major, as AttentionMetadata.write_slots
    positions: torch.Tensor,  # [B]
    metric_power: torch.Tensor,  # [B]
    collection_buffer: torch.Tensor,  # [B]
    collects: bool,
) -> AttentionMetadata:
    """The metadata of a decode step whose forward is captured once and replayed (a CUDA
    graph): every tensor is a static buffer the caller refills before each replay, and
    nothing depends on the lengths the step's heads hold. Only the Triton backend runs it:
    its kernels read each head's length in the device, and their splits cover the longest
    head a sequence may hold. ``collects``: the step runs the metric kernel (a sequence with
    power 0 adds nothing), with every sequence's collection buffer."""
    B = seq_slots.shape[0]
    max_blocks = cache.config.max_blocks_per_head
    none = torch.empty(0, dtype=torch.long, device=seq_slots.device)
    decode = DecodeMetadata(
        # The gather fields of the torch backend: unused by the kernels, left empty.
        blocks=none,
        lens=none,
        offsets=none,
        max_blocks=max_blocks,
        layer_blocks=(),
        positions=positions,
        metric_power=metric_power,
        any_metric=collects,
        collection_buffer=collection_buffer,
        any_buffer=collects,
    )
    append = AppendPlan(
        slots=write_slots.view(cache.num_layers, B, cache.num_kv_heads).transpose(1, 2),
        positions=positions,
        token_seq_index=torch.arange(B, device=seq_slots.device),
    )
    return AttentionMetadata(
        seq_slots=seq_slots,
        append=append,
        write_slots=write_slots,
        query_lens=[1] * B,
        num_decode=B,
        decode=decode,
        chunks=[],
    )


def build_metadata(
    cache: PagedKVCache,
    *,
    seq_slots: torch.Tensor,
    append: AppendPlan,
    query_lens: list[int],
    num_decode: int,
    computed: list[int],
    metric_powers: list[int],
    metric_settings: Sequence[MetricConfig] | None = None,
    metric_power: torch.Tensor | None = None,
    collection_buffer: torch.Tensor | None = None,
    capture: QueryCapture | None = None,
    window_capture: QueryCapture | None = None,
    spans: Sequence[torch.Tensor | None] | None = None,
) -> AttentionMetadata:
    """The metadata of one step, after ``append`` (the step's :meth:`prepare_append`).

    ``computed[i]`` is the number of tokens sequence ``i`` had fed before this step (0 for a
    first chunk); ``metric_powers[i]`` is 0 for a sequence that collects no metric, and
    ``metric_settings[i]`` says how it collects (default: ``MetricConfig()`` for every
    sequence). ``metric_power`` and ``collection_buffer``, the same values as tensors on the
    cache's device, may be passed when the caller already built them (one host-to-device
    copy per step instead of several). ``capture`` names the queries to keep,
    ``window_capture`` the windows whose mean query to keep. ``spans[i]``, for a sequence
    whose metric is pooled over spans, gives the span start of each of its positions up to
    its chunk's last (:class:`ChunkMetadata`).
    """
    dev = seq_slots.device
    settings = list(metric_settings or [MetricConfig()] * len(query_lens))
    if metric_power is None:
        metric_power = torch.tensor(metric_powers, dtype=torch.long, device=dev)
    buffers = [m.collection_buffer for m in settings]
    if collection_buffer is None:
        collection_buffer = torch.tensor(buffers, dtype=torch.long, device=dev)
    bs = cache.block_size
    decode = None
    if num_decode:
        rows = seq_slots[:num_decode]
        # The widest head of the decode rows, known from the append without a device sync.
        longest = max(append.seq_max_lens[:num_decode])
        shortest = min(append.seq_min_lens[:num_decode])
        max_blocks = max(1, -(-longest // bs))
        layer_blocks = tuple(
            max(1, -(-max(lens[:num_decode]) // bs)) for lens in append.layer_max_lens
        )
        tables = cache.block_tables[:, rows, :, :max_blocks]  # [L, B, H, nb]
        decode = DecodeMetadata(
            blocks=tables.clamp(min=0),
            lens=cache.context_lens[:, rows].unsqueeze(-1),
            offsets=torch.arange(max_blocks * bs, device=dev),
            max_blocks=max_blocks,
            layer_blocks=layer_blocks,
            positions=append.positions[:num_decode],
            metric_power=metric_power[:num_decode],
            any_metric=any(p > 0 for p in metric_powers[:num_decode]),
            collection_buffer=collection_buffer[:num_decode],
            any_buffer=any(
                p > 0 and b > 0
                for p, b in zip(metric_powers[:num_decode], buffers[:num_decode], strict=True)
            ),
            uniform_len=longest if shortest == longest else None,
        )
    chunks = []
    start = num_decode
    for i in range(num_decode, len(query_lens)):
        n = query_lens[i]
        history = None
        if computed[i]:
            nb = max(1, -(-append.seq_max_lens[i] // bs))
            slot = seq_slots[i]
            history = HistoryMetadata(
                blocks=cache.block_tables[:, slot, :, :nb]
                .clamp(min=0)
                .reshape(cache.num_layers, -1),
                old_lens=(cache.context_lens[:, slot] - n).view(cache.num_layers, -1, 1, 1),
                offsets=torch.arange(nb * bs, device=dev),
                query_offsets=torch.arange(n, device=dev).view(n, 1),
                max_blocks=nb,
            )
        chunks.append(
            ChunkMetadata(
                i,
                start,
                start + n,
                metric_powers[i],
                settings[i],
                history,
                None if spans is None else spans[i],
            )
        )
        start += n
    return AttentionMetadata(
        seq_slots=seq_slots,
        append=append,
        write_slots=append.slots.transpose(1, 2).reshape(cache.num_layers, -1),
        query_lens=query_lens,
        num_decode=num_decode,
        decode=decode,
        chunks=chunks,
        capture=capture,
        window_capture=window_capture,
    )
