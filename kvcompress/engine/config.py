"""Engine configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvcompress.cache import parse_size
from kvcompress.compress import CompressionParams, MetricConfig


@dataclass
class EngineConfig:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    kv_cache_memory: int | str = "1GiB"
    block_size: int = 16
    max_num_seqs: int = 64  # running sequences at once
    max_model_len: int | None = None  # None: the model's own context length
    # Tokens one step feeds, decodes and prefill chunks together: bounds how long a step
    # makes the running requests wait for their next token.
    max_num_batched_tokens: int = 2048
    prefill_chunk_size: int | None = None  # prompt tokens per chunk; None: sized for the device
    # Tokens of future growth a request that does not evict reserves at admission (bounded
    # by its max_tokens), so that admitting prompts does not force preemptions soon after.
    decode_headroom: int = 256
    max_kvs_per_pass: int = 1 << 24  # KVs sorted in one compression pass
    max_queue: int | None = None  # waiting requests allowed; None: unbounded
    compression: CompressionParams = field(default_factory=CompressionParams)
    metric: MetricConfig = field(default_factory=MetricConfig)
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        self.kv_cache_memory = parse_size(self.kv_cache_memory)
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_kvs_per_pass"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.prefill_chunk_size is not None and (
            not isinstance(self.prefill_chunk_size, int) or self.prefill_chunk_size < 1
        ):
            raise ValueError(
                f"prefill_chunk_size must be an integer >= 1, got {self.prefill_chunk_size!r}"
            )
        if not isinstance(self.decode_headroom, int) or self.decode_headroom < 0:
            raise ValueError(
                f"decode_headroom must be an integer >= 0, got {self.decode_headroom!r}"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_queue is not None and self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if not isinstance(self.compression, CompressionParams):
            raise TypeError("compression must be a CompressionParams")

    @property
    def chunk_size(self) -> int:
        """Prompt tokens per prefill chunk: ``prefill_chunk_size``, or 512 on CPU (where
        attention cost grows fastest with the chunk) and 2048 on accelerators."""
        if self.prefill_chunk_size is not None:
            return self.prefill_chunk_size
        return 512 if torch.device(self.device).type == "cpu" else 2048
