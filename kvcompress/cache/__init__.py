"""The paged KV cache whose unit of paging is one KV head of one layer.

Engine-agnostic: nothing here knows about models, schedulers or servers.
"""

from kvcompress.cache.block_pool import BlockPool, OutOfBlocksError
from kvcompress.cache.config import CacheConfig
from kvcompress.cache.paged_cache import AppendPlan, HeadView, PagedKVCache
from kvcompress.cache.quant import FP8, copyable, is_fp8, kv_dtype_from_name
from kvcompress.cache.sizes import format_size, parse_size
from kvcompress.cache.swap import SwappedSeq, swap_bytes, swap_in, swap_out

__all__ = [
    "FP8",
    "AppendPlan",
    "BlockPool",
    "CacheConfig",
    "HeadView",
    "OutOfBlocksError",
    "PagedKVCache",
    "SwappedSeq",
    "copyable",
    "format_size",
    "is_fp8",
    "kv_dtype_from_name",
    "parse_size",
    "swap_bytes",
    "swap_in",
    "swap_out",
]
