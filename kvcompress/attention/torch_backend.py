"""Attention on the per-head paged cache in plain torch (CPU and CUDA).

A step holds decode rows and prefill chunks (see :mod:`kvcompress.attention.metadata`).
A first chunk attends within its own tokens (causal SDPA) and sets the observation-window
metric of its KVs. A later chunk gathers what each of its KV heads already holds and
attends to that and, causally, to itself; its window, max-pooled by position over every KV
held, replaces the older KVs' metric and initialises its own. Decode gathers each KV head's
blocks up to that head's own length, so each query head reads its KV head's block table; the
step's attention probabilities are added to the metric of every KV they attended to.

How a sequence collects (observation window, pooling kernel and spans, collection buffer)
comes with it in the step's metadata, so one batch may mix requests with different
settings. A sequence whose scorer reads its newest query (``last-query``) has it kept by
``forward`` (``AttentionMetadata.capture``), one that reads statistics of its window's
queries (``expected-attention``) has that window's queries kept (``window_capture``); the
others cost nothing for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvcompress.attention.metadata import AttentionMetadata, ChunkMetadata, DecodeMetadata
from kvcompress.cache import PagedKVCache
from kvcompress.compress import decode_metric, pool_by_position, window_metric
from kvcompress.compress.workspace import Workspace


class TorchAttentionBackend:
    # The prefill window metric (a backend may swap in a kernel of the same signature).
    window_metric = staticmethod(window_metric)

    def __init__(self, cache: PagedKVCache) -> None:
        self.cache = cache
        self.workspace = Workspace(cache.config.device)

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        # The cache converts to its storage dtype (fp8: with the layer's scales).
        self.cache.write_tokens(meta.write_slots[layer], k, v, layer=layer)
        if meta.capture is not None:
            meta.capture.keep(layer, q)
        if meta.window_capture is not None:
            meta.window_capture.keep(layer, q)
        nd = meta.num_decode
        if not meta.chunks:
            return self._decode(layer, q, meta)
        if meta.fresh_only:
            return self._prefill(layer, q, k, v, meta)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self._decode(layer, q[:nd], meta)
        self._chunks(layer, q, k, v, meta, out)
        return out

    # ------------------------------------------------------------------ prefill
    def _prefill(self, layer, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        """A step of first chunks only (sequences that held nothing before)."""
        scale = q.shape[-1] ** -0.5
        lens = meta.query_lens
        if len(set(lens)) == 1:
            # Equal lengths (one prompt, or a batch of equal ones): one batched kernel.
            B, n = len(lens), lens[0]
            out = self._causal(*(t.view(B, n, *t.shape[1:]) for t in (q, k, v)), scale)
            out = out.reshape(q.shape)
            for chunk in meta.chunks:
                self._fresh_metric(layer, q, k, scale, chunk, meta)
            return out
        out = torch.empty_like(q)
        self._chunks(layer, q, k, v, meta, out)
        return out

    def _chunks(self, layer, q, k, v, meta: AttentionMetadata, out: torch.Tensor) -> None:
        """Every chunk of the step, one sequence at a time (a step holds few chunks)."""
        scale = q.shape[-1] ** -0.5
        for chunk in meta.chunks:
            rows = slice(chunk.start, chunk.end)
            if chunk.history is None:
                out[rows] = self._causal(q[rows], k[rows], v[rows], scale)[0]
                self._fresh_metric(layer, q, k, scale, chunk, meta)
            else:
                out[rows] = self._with_history(layer, q[rows], scale, chunk, meta)

    def _fresh_metric(self, layer, q, k, scale, chunk: ChunkMetadata, meta) -> None:
        """A first chunk's KVs start with its observation-window metric."""
        if not chunk.metric_power:
            return
        start, end = chunk.start, chunk.end
        w = min(chunk.metric.window_size, end - start)
        q_win = q[end - w : end].transpose(0, 1)  # [Hq, w, D]
        metric = self.window_metric(
            q_win, k[start:end], scale, chunk.metric_power, chunk.metric, chunk.spans
        )
        slots = meta.append.slots[layer][:, start:end]  # [H, n]
        self.cache.metric.view(-1)[slots.reshape(-1)] = metric.reshape(-1)

    def _with_history(
        self, layer: int, q: torch.Tensor, scale: float, chunk: ChunkMetadata, meta
    ) -> torch.Tensor:
        """A chunk of a sequence that already holds KVs: each token attends to what its
        KV head held before the chunk and, causally, to the chunk (written just before)."""
        h = chunk.history
        assert h is not None
        cache = self.cache
        n, Hq, D = q.shape
        H = cache.num_kv_heads
        G = Hq // H
        index = h.blocks[layer]
        keys = cache.k_pool.index_select(0, index).view(H, h.width, D)
        values = cache.v_pool.index_select(0, index).view(H, h.width, D)
        if cache.quantized:
            keys = cache.dequantize(layer, keys, "k", q.dtype)
            values = cache.dequantize(layer, values, "v", q.dtype)
        old = h.old_lens[layer]  # [H, 1, 1]
        visible = h.offsets <= old + h.query_offsets  # [H, n, W]
        # Each KV head's query heads as one block of rows: the head's mask serves its group.
        qg = q.view(n, H, G, D).permute(1, 2, 0, 3).reshape(H, G * n, D)
        if qg.dtype != keys.dtype:
            qg = qg.to(keys.dtype)
        mask = visible.unsqueeze(1).expand(H, G, n, h.width).reshape(H, G * n, h.width)
        out = F.scaled_dot_product_attention(
            qg[None], keys[None], values[None], attn_mask=mask[None], scale=scale
        )[0]
        out = out.view(H, G, n, D).permute(2, 0, 1, 3).reshape(n, Hq, D)
        if chunk.metric_power:
            self._history_metric(layer, q, keys, visible, scale, chunk, meta)
        return out if out.dtype == q.dtype else out.to(q.dtype)

    def _history_metric(self, layer, q, keys, visible, scale, chunk: ChunkMetadata, meta) -> None:
        """The chunk's observation window (its last ``w`` queries) against every key it sees,
        max-pooled along token positions: the new metric of every KV the head holds, older
        ones and the chunk's own alike."""
        h = chunk.history
        assert h is not None
        cache = self.cache
        config = chunk.metric
        n, Hq, D = q.shape
        H, W = keys.shape[0], h.width
        G = Hq // H
        w = min(config.window_size, n)
        q_win = q[n - w :].float().view(w, H, G, D).permute(1, 2, 0, 3)  # [H, G, w, D]
        logits = torch.matmul(q_win, keys.float().transpose(1, 2).unsqueeze(1)) * scale
        see = visible[:, n - w :].unsqueeze(1)  # [H, 1, w, W]
        probs = torch.softmax(logits.masked_fill(~see, float("-inf")), dim=-1)
        if chunk.metric_power == 2:
            probs = probs * probs
        key_pos = cache.position.index_select(0, h.blocks[layer]).view(H, W)
        if config.collection_buffer:
            query_pos = meta.append.positions[chunk.start + n - w : chunk.start + n]
            near = (
                query_pos.view(1, 1, w, 1) - key_pos.view(H, 1, 1, W)
            ) < config.collection_buffer
            probs = probs.masked_fill(near, 0.0)
        old = h.old_lens[layer].view(H, 1)
        held = h.offsets < old + n  # [H, W]
        # Pooled by position over everything the head holds, as a one-shot compression
        # pools the whole prompt (older KVs are no longer contiguous, nor in slot order).
        spans = None if chunk.spans is None else chunk.spans.expand(H, -1)
        pooled = pool_by_position(probs.sum(dim=2), key_pos, held, config.pool_kernel, spans)
        contrib = torch.where(held.unsqueeze(1), pooled, 0.0).sum(dim=1)  # [H, W]
        bs = cache.block_size
        key_slots = (h.blocks[layer].view(H, -1, 1) * bs + h.offsets[:bs]).view(-1)
        flat = cache.metric.view(-1)
        # The window replaces the older KVs' metric rather than adding to it: the next
        # compression then ranks every held KV by the latest queries alone, as a one-shot
        # compression ranks the whole prompt by its last window (summing favoured KVs that
        # had survived many windows over the newest ones: docs/quality.md). The chunk's own
        # slots were zeroed by the append. Two adds, not an assignment: padding slots alias
        # real ones (block 0) and must change nothing.
        stale = torch.where(h.offsets < old, flat[key_slots].view(H, W), 0.0)
        flat.index_add_(0, key_slots, stale.view(-1).neg())
        flat.index_add_(0, key_slots, contrib.view(-1))

    @staticmethod
    def _causal(q, k, v, scale) -> torch.Tensor:
        """Causal attention of ``[B, n, heads, D]`` (or one ``[n, heads, D]``) sequences."""
        # 4-D inputs: with a batch dimension SDPA takes its fused CPU kernel (several times
        # faster than on 3-D inputs); enable_gqa spares repeating K and V per query head.
        if q.dim() == 3:
            q, k, v = q[None], k[None], v[None]
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            scale=scale,
            enable_gqa=True,
        )
        return o.transpose(1, 2)  # [B, n, Hq, D]

    # ------------------------------------------------------------------ decode
    def _gather(
        self,
        layer: int,
        d: DecodeMetadata,
        index: torch.Tensor,
        batch: int,
        dtype: torch.dtype | None = None,
    ):
        """This layer's K and V of every head of the batch, ``[B, H, W, D]`` with ``W`` the
        layer's own width (``index``: its block ids, ``d.layer_block_ids(layer)``); an fp8
        cache's are dequantised to ``dtype`` (the queries')."""
        cache = self.cache
        shape = (index.numel(), cache.block_size, cache.head_dim)
        ws = self.workspace
        k = torch.index_select(cache.k_pool, 0, index, out=ws.get("k", shape, cache.k_pool.dtype))
        v = torch.index_select(cache.v_pool, 0, index, out=ws.get("v", shape, cache.v_pool.dtype))
        view = (batch, cache.num_kv_heads, d.layer_blocks[layer] * cache.block_size, cache.head_dim)
        k, v = k.view(view), v.view(view)
        if cache.quantized:
            k = cache.dequantize(layer, k, "k", dtype or torch.float32)
            v = cache.dequantize(layer, v, "v", dtype or torch.float32)
        return k, v

    def _decode(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        d = meta.decode
        assert d is not None, "decode metadata is built by build_metadata"
        B, Hq, D = q.shape
        index = d.layer_block_ids(layer)  # once: the metric reads it too
        k, v = self._gather(layer, d, index, B, q.dtype)
        H = k.shape[1]
        # Each KV head's query heads as the rows of one query block ([B, H, G, D]): every
        # head's mask then broadcasts over its group, with no per-head copy of the mask.
        qh = q.view(B, H, Hq // H, D)
        if qh.dtype != k.dtype:
            qh = qh.to(k.dtype)
        if not d.any_metric:
            # No sequence needs the probabilities: one fused kernel does it all.
            n = d.uniform_len
            if n is not None:  # every head holds n KVs: no mask, just the first n slots
                out = F.scaled_dot_product_attention(qh, k[:, :, :n], v[:, :, :n])
            else:
                valid = (d.layer_offsets(layer) < d.lens[layer]).unsqueeze(2)  # [B, H, 1, W]
                out = F.scaled_dot_product_attention(qh, k, v, attn_mask=valid)
        else:
            valid = (d.layer_offsets(layer) < d.lens[layer]).unsqueeze(2)
            logits = torch.matmul(qh, k.transpose(-1, -2)).float() * D**-0.5  # [B, H, G, W]
            logits = logits.masked_fill_(~valid, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            out = torch.matmul(probs.to(v.dtype), v)  # [B, H, G, D]
            self._accumulate(index, probs, valid, meta)
        out = out.reshape(B, Hq, D)
        return out if out.dtype == q.dtype else out.to(q.dtype)

    def _accumulate(self, index: torch.Tensor, probs, valid, meta: AttentionMetadata) -> None:
        """Add this step's probabilities to the metric of every KV they attended to."""
        d = meta.decode
        assert d is not None
        B, H, G, W = probs.shape
        bs = self.cache.block_size
        # Flat slot of every gathered KV (padding maps into block 0 and adds exactly 0).
        blocks = index.view(B, H, -1, 1)
        key_slots = (blocks * bs + d.offsets[:bs]).view(B, H, W)
        power = d.metric_power  # 0 where a sequence collects nothing
        contrib = decode_metric(probs.view(B, H * G, W), power, H)  # [B, H, W]
        keep = valid.view(B, H, W) & (power.view(B, 1, 1) > 0)
        if d.any_buffer:  # each sequence's own buffer (0 for most)
            positions = self.cache.position.view(-1)[key_slots].long()
            current = d.positions.view(B, 1, 1)
            keep &= (current - positions) >= d.collection_buffer.view(B, 1, 1)
        # Every gathered slot, zero where not kept: no boolean indexing (a device sync).
        contrib = torch.where(keep, contrib, 0.0)
        self.cache.metric.view(-1).index_add_(0, key_slots.view(-1), contrib.view(-1))
