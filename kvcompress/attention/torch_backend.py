"""Attention on the per-head paged cache in plain torch (CPU and CUDA).

Prefill (of sequences that hold no KVs yet) attends within each sequence's own new tokens
(causal SDPA) and sets the observation-window metric of its KVs. Decode gathers each KV
head's blocks up to that head's own length, so each query head reads its KV head's block
table; the step's attention probabilities are added to the metric of every KV they attended
to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvcompress.attention.metadata import AttentionMetadata, DecodeMetadata
from kvcompress.cache import PagedKVCache
from kvcompress.compress import MetricConfig, decode_metric, window_metric
from kvcompress.compress.workspace import Workspace


class TorchAttentionBackend:
    def __init__(self, cache: PagedKVCache, metric_config: MetricConfig | None = None) -> None:
        self.cache = cache
        self.metric_config = metric_config or MetricConfig()
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
        if meta.is_prefill:
            return self._prefill(layer, q, k, v, meta)
        return self._decode(layer, q, meta)

    # ------------------------------------------------------------------ prefill
    def _prefill(self, layer, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5
        lens = meta.query_lens
        if len(set(lens)) == 1:
            # Equal lengths (one prompt, or a batch of equal ones): one batched kernel.
            B, n = len(lens), lens[0]
            out = self._causal(*(t.view(B, n, *t.shape[1:]) for t in (q, k, v)), scale)
            out = out.reshape(q.shape)
        else:
            # Ragged: one sequence at a time (prefill batches are few).
            out = torch.empty_like(q)
            start = 0
            for n in lens:
                end = start + n
                out[start:end] = self._causal(q[start:end], k[start:end], v[start:end], scale)[0]
                start = end
        if meta.any_metric:
            self._window_metrics(layer, q, k, scale, meta)
        return out

    def _window_metrics(self, layer, q, k, scale, meta: AttentionMetadata) -> None:
        """Each collecting prompt's KVs start with its observation-window metric."""
        slots = meta.append.slots[layer]  # [H, N]
        start = 0
        for n, power in zip(meta.query_lens, meta.metric_powers, strict=True):
            end = start + n
            if power:
                w = min(self.metric_config.window_size, n)
                q_win = q[end - w : end].transpose(0, 1)  # [Hq, w, D]
                metric = window_metric(q_win, k[start:end], scale, power, self.metric_config)
                self.cache.metric.view(-1)[slots[:, start:end].reshape(-1)] = metric.reshape(-1)
            start = end

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
    def _gather(self, layer: int, d: DecodeMetadata, batch: int, dtype: torch.dtype | None = None):
        """This layer's K and V of every head of the batch, ``[B, H, W, D]``; an fp8 cache's
        are dequantised to ``dtype`` (the queries')."""
        cache = self.cache
        index = d.blocks[layer]
        shape = (index.numel(), cache.block_size, cache.head_dim)
        ws = self.workspace
        k = torch.index_select(cache.k_pool, 0, index, out=ws.get("k", shape, cache.k_pool.dtype))
        v = torch.index_select(cache.v_pool, 0, index, out=ws.get("v", shape, cache.v_pool.dtype))
        view = (batch, cache.num_kv_heads, d.width, cache.head_dim)
        k, v = k.view(view), v.view(view)
        if cache.quantized:
            k = cache.dequantize(layer, k, "k", dtype or torch.float32)
            v = cache.dequantize(layer, v, "v", dtype or torch.float32)
        return k, v

    def _decode(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        d = meta.decode
        assert d is not None, "decode metadata is built by build_metadata"
        B, Hq, D = q.shape
        k, v = self._gather(layer, d, B, q.dtype)
        H = k.shape[1]
        # Each KV head's query heads as the rows of one query block ([B, H, G, D]): every
        # head's mask then broadcasts over its group, with no per-head copy of the mask.
        qh = q.view(B, H, Hq // H, D)
        if qh.dtype != k.dtype:
            qh = qh.to(k.dtype)
        if not meta.any_metric:
            # No sequence needs the probabilities: one fused kernel does it all.
            n = d.uniform_len
            if n is not None:  # every head holds n KVs: no mask, just the first n slots
                out = F.scaled_dot_product_attention(qh, k[:, :, :n], v[:, :, :n])
            else:
                valid = (d.offsets < d.lens[layer]).unsqueeze(2)  # [B, H, 1, W]
                out = F.scaled_dot_product_attention(qh, k, v, attn_mask=valid)
        else:
            valid = (d.offsets < d.lens[layer]).unsqueeze(2)
            logits = torch.matmul(qh, k.transpose(-1, -2)).float() * D**-0.5  # [B, H, G, W]
            logits = logits.masked_fill_(~valid, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            out = torch.matmul(probs.to(v.dtype), v)  # [B, H, G, D]
            self._accumulate(layer, probs, valid, meta)
        out = out.reshape(B, Hq, D)
        return out if out.dtype == q.dtype else out.to(q.dtype)

    def _accumulate(self, layer: int, probs, valid, meta: AttentionMetadata) -> None:
        """Add this step's probabilities to the metric of every KV they attended to."""
        d = meta.decode
        assert d is not None
        B, H, G, W = probs.shape
        bs = self.cache.block_size
        # Flat slot of every gathered KV (padding maps into block 0 and adds exactly 0).
        blocks = d.blocks[layer].view(B, H, -1, 1)
        key_slots = (blocks * bs + d.offsets[:bs]).view(B, H, W)
        power = meta.metric_power  # 0 where a sequence collects nothing
        contrib = decode_metric(probs.view(B, H * G, W), power, H)  # [B, H, W]
        keep = valid.view(B, H, W) & (power.view(B, 1, 1) > 0)
        buffer = self.metric_config.collection_buffer
        if buffer:
            positions = self.cache.position.view(-1)[key_slots].long()
            current = meta.append.positions.view(B, 1, 1)
            keep &= (current - positions) >= buffer
        # Every gathered slot, zero where not kept: no boolean indexing (a device sync).
        contrib = torch.where(keep, contrib, 0.0)
        self.cache.metric.view(-1).index_add_(0, key_slots.view(-1), contrib.view(-1))
