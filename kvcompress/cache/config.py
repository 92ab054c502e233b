"""Shape and size of a paged per-head KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.cache.quant import KV_DTYPES
from kvcompress.cache.sizes import parse_size

# Per cached KV, besides K and V: the eviction metric (fp32) and the original position (int32).
METADATA_BYTES_PER_KV = 4 + 4


@dataclass
class CacheConfig:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_cache_memory: int | str = "1GiB"
    block_size: int = 16
    dtype: torch.dtype = torch.float32  # storage of K and V; fp8: see cache/quant.py
    device: str | torch.device = "cpu"
    max_seqs: int = 256
    max_model_len: int = 8192

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "max_seqs", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        bs = self.block_size
        if not isinstance(bs, int) or bs < 1 or bs > 128 or bs & (bs - 1):
            raise ValueError(f"block_size must be a power of two from 1 to 128, got {bs!r}")
        if self.dtype not in KV_DTYPES:
            raise ValueError(f"dtype must be one of {KV_DTYPES}, got {self.dtype!r}")
        self.kv_cache_memory = parse_size(self.kv_cache_memory)
        self.device = torch.device(self.device)
        if self.num_blocks < self.num_heads_total:
            raise ValueError(
                f"kv_cache_memory={self.kv_cache_memory} bytes holds {self.num_blocks} blocks of "
                f"{self.bytes_per_block} bytes, fewer than one block per (layer, KV head) "
                f"({self.num_heads_total}); raise kv_cache_memory or lower block_size"
            )

    @property
    def num_heads_total(self) -> int:
        """(layer, KV head) pairs: the number of block-table rows per sequence."""
        return self.num_layers * self.num_kv_heads

    @property
    def bytes_per_kv(self) -> int:
        # The real element size: fp8 halves bf16's K and V bytes (its per-(layer, head)
        # scales are not per KV), so the same budget holds more blocks.
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.head_dim * element + METADATA_BYTES_PER_KV

    @property
    def bytes_per_block(self) -> int:
        return self.block_size * self.bytes_per_kv

    @property
    def num_blocks(self) -> int:
        assert isinstance(self.kv_cache_memory, int)
        return self.kv_cache_memory // self.bytes_per_block

    @property
    def max_blocks_per_head(self) -> int:
        return -(-self.max_model_len // self.block_size)
