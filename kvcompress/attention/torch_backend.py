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

from kvcompress.attention.metadata import AttentionMetadata
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
        cache = self.cache
        slots = meta.append.slots[layer]  # [H, N]
        cache.write(layer, slots, k.to(cache.k_pool.dtype), v.to(cache.v_pool.dtype))
        if meta.is_prefill:
            return self._prefill(layer, q, k, v, slots, meta)
        return self._decode(layer, q, meta)

    # ------------------------------------------------------------------ prefill
    def _prefill(self, layer, q, k, v, slots, meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        scale = q.shape[-1] ** -0.5
        start = 0
        # One sequence at a time: prefill batches are few and ragged.
        for i, n in enumerate(meta.query_lens):
            end = start + n
            qs, ks = q[start:end], k[start:end]
            out[start:end] = self._causal(qs, ks, v[start:end], scale)
            if meta.collect_metric[i]:
                w = min(self.metric_config.window_size, n)
                q_win = qs[n - w :].transpose(0, 1)  # [Hq, w, D]
                power = int(meta.metric_power[i])
                metric = window_metric(q_win, ks, scale, power, self.metric_config)
                self.cache.metric.view(-1)[slots[:, start:end].reshape(-1)] = metric.reshape(-1)
            start = end
        return out

    @staticmethod
    def _causal(q, k, v, scale) -> torch.Tensor:
        # 4-D inputs: with a batch dimension SDPA takes its fused CPU kernel (several times
        # faster than on 3-D inputs); enable_gqa spares repeating K and V per query head.
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            is_causal=True,
            scale=scale,
            enable_gqa=True,
        )
        return o[0].transpose(0, 1)

    # ------------------------------------------------------------------ decode
    def _gather(self, tables: torch.Tensor, lens: torch.Tensor, max_blocks: int):
        """K, V ``[B, H, W, D]``, flat slots ``[B, H, W]`` and validity of held KVs."""
        cache = self.cache
        bs = cache.block_size
        B, H = lens.shape
        blocks = tables[:, :, : max(1, max_blocks)].clamp(min=0)
        index = blocks.reshape(-1)
        d = cache.head_dim
        shape = (index.numel(), bs, d)
        ws = self.workspace
        k = torch.index_select(cache.k_pool, 0, index, out=ws.get("k", shape, cache.k_pool.dtype))
        v = torch.index_select(cache.v_pool, 0, index, out=ws.get("v", shape, cache.v_pool.dtype))
        W = blocks.shape[-1] * bs
        offsets = torch.arange(bs, device=lens.device)
        key_slots = (blocks.unsqueeze(-1) * bs + offsets).reshape(B, H, W)
        valid = torch.arange(W, device=lens.device) < lens.unsqueeze(-1)
        return k.view(B, H, W, d), v.view(B, H, W, d), key_slots, valid

    def _decode(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        cache = self.cache
        tables, lens = cache.tables_for(layer, meta.seq_slots)
        k, v, key_slots, valid = self._gather(tables, lens, meta.max_blocks)
        B, H, _, D = k.shape
        Hq = q.shape[1]
        group = Hq // H
        if not meta.any_metric:
            # No sequence needs the probabilities: one fused kernel does it all.
            out = F.scaled_dot_product_attention(
                q.view(B, Hq, 1, D).to(k.dtype),
                k,
                v,
                attn_mask=valid.view(B, H, 1, -1).repeat_interleave(group, dim=1),
                enable_gqa=True,
            )
            return out.reshape(B, Hq, D).to(q.dtype)
        qh = q.view(B, H, group, D)
        logits = torch.matmul(qh, k.transpose(-1, -2)).float() * D**-0.5  # [B, H, G, W]
        logits = logits.masked_fill(~valid.unsqueeze(2), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        out = torch.matmul(probs.to(v.dtype), v)  # [B, H, G, D]
        self._accumulate(probs, key_slots, valid, meta)
        return out.reshape(B, Hq, D).to(q.dtype)

    def _accumulate(self, probs, key_slots, valid, meta: AttentionMetadata) -> None:
        B, H, G, W = probs.shape
        power = torch.where(
            torch.tensor(meta.collect_metric, device=probs.device), meta.metric_power, 0
        )
        contrib = decode_metric(probs.reshape(B, H * G, W), power, H)  # [B, H, W]
        keep = valid & (power.view(B, 1, 1) > 0)
        buffer = self.metric_config.collection_buffer
        if buffer:
            positions = self.cache.position.view(-1)[key_slots].long()
            current = meta.append.positions.view(B, 1, 1)
            keep &= (current - positions) >= buffer
        self.cache.metric.view(-1).index_add_(0, key_slots[keep], contrib[keep])
