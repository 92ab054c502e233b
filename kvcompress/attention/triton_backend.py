"""The Triton backend: paged decode straight from the pools, prefill as the torch backend.

Decode (``_decode``) reads each (layer, sequence, KV head)'s block-table row and length in the
kernel (:func:`~kvcompress.attention.triton.decode.paged_decode`): no gather copy of K and V,
split-K for long heads, the eviction metric added in the same kernel family. The prefill
window metric uses the streaming kernel (:mod:`~kvcompress.attention.triton.window`).
Prefill attention itself is the torch backend's (SDPA's fused kernels serve it well), and so
is the attention of a chunk against KVs already paged (a gather per chunk, few per step).
"""

from __future__ import annotations

import torch

from kvcompress.attention.metadata import AttentionMetadata
from kvcompress.attention.torch_backend import TorchAttentionBackend
from kvcompress.attention.triton.decode import MetricSink, paged_decode
from kvcompress.attention.triton.window import window_metric
from kvcompress.cache import PagedKVCache


class TritonAttentionBackend(TorchAttentionBackend):
    # The prefill window metric, same signature as compress.window_metric.
    window_metric = staticmethod(window_metric)

    def __init__(self, cache: PagedKVCache, block_n: int = 64) -> None:
        super().__init__(cache)
        self.block_n = block_n  # keys per kernel tile

    def _decode(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The decode rows (the step's first ``B`` sequences, one token each)."""
        d = meta.decode
        assert d is not None, "decode metadata is built by build_metadata"
        cache = self.cache
        B = q.shape[0]
        seq_slots = meta.seq_slots[:B]
        sink = None
        if d.any_metric:
            sink = MetricSink(
                cache.metric,
                cache.position,
                d.metric_power,
                d.positions,
                # Each sequence's own buffer; None: none has one, positions are not read.
                d.collection_buffer if d.any_buffer else None,
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
