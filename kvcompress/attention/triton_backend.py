"""The Triton backend: paged decode straight from the pools, prefill as the torch backend.

Decode (``_decode``) reads each (layer, sequence, KV head)'s block-table row and length in the
kernel (:func:`~kvcompress.attention.triton.decode.paged_decode`): no gather copy of K and V,
split-K for long heads, the eviction metric added in the same kernel family. The prefill
window metric uses the streaming kernel (:mod:`~kvcompress.attention.triton.window`).
Prefill attention itself is the torch backend's (SDPA's fused kernels serve it well), and so
is any prefill of a chunk against KVs already paged.
"""

from __future__ import annotations

import torch

from kvcompress.attention.metadata import AttentionMetadata
from kvcompress.attention.torch_backend import TorchAttentionBackend
from kvcompress.attention.triton.decode import MetricSink, paged_decode
from kvcompress.attention.triton.window import window_metric
from kvcompress.cache import PagedKVCache
from kvcompress.compress import MetricConfig


class TritonAttentionBackend(TorchAttentionBackend):
    # The prefill window metric, same signature as compress.window_metric.
    window_metric = staticmethod(window_metric)

    def __init__(
        self,
        cache: PagedKVCache,
        metric_config: MetricConfig | None = None,
        block_n: int = 64,
    ) -> None:
        super().__init__(cache, metric_config)
        self.block_n = block_n  # keys per kernel tile

    def _decode(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The decode rows (the step's first ``B`` sequences, one token each)."""
        d = meta.decode
        assert d is not None, "decode metadata is built by build_metadata"
        cache = self.cache
        B = q.shape[0]
        seq_slots = meta.seq_slots[:B]
        sink = None
        if meta.any_metric:
            sink = MetricSink(
                cache.metric,
                cache.position,
                meta.metric_power[:B],
                meta.append.positions[:B],
                self.metric_config.collection_buffer,
            )
        scales = (cache.k_scale[layer], cache.v_scale[layer]) if cache.quantized else (None, None)
        return paged_decode(
            q if q.is_contiguous() else q.contiguous(),
            cache.k_pool,
            cache.v_pool,
            cache.block_tables[layer],
            cache.context_lens[layer],
            seq_slots,
            max_len=d.max_blocks * cache.block_size,
            k_scale=scales[0],
            v_scale=scales[1],
            metric=sink,
            block_n=self.block_n,
        ).out

    def _window_metrics(self, layer, q, k, scale, meta: AttentionMetadata) -> None:
        """Each collecting prompt's KVs start with its observation-window metric."""
        slots = meta.append.slots[layer]  # [H, N]
        start = 0
        for n, power in zip(meta.query_lens, meta.metric_powers, strict=True):
            end = start + n
            if power:
                w = min(self.metric_config.window_size, n)
                q_win = q[end - w : end].transpose(0, 1)  # [Hq, w, D]
                metric = self.window_metric(
                    q_win, k[start:end], scale, power, self.metric_config, block_n=self.block_n
                )
                self.cache.metric.view(-1)[slots[:, start:end].reshape(-1)] = metric.reshape(-1)
            start = end
