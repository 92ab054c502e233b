"""Engine configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvcompress.attention import ATTENTION_BACKENDS, resolve_backend
from kvcompress.cache import kv_dtype_from_name, parse_size
from kvcompress.compress import CompressionParams, MetricConfig
from kvcompress.models import packing_available


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
    # When an evicting prompt is compressed. "when-needed": once its prefill ends, and between
    # its chunks only when the pool needs their blocks, so that a prompt whose KVs fit is
    # ranked whole by its last window, as one-shot compression ranks it (an early chunk's
    # window has not seen the question at the end). "every-chunk": after every chunk, so
    # that each request holds at most its budget and one chunk.
    prefill_compression: str = "when-needed"
    # Tokens of future growth a request that does not evict reserves at admission (bounded
    # by its max_tokens), so that admitting prompts does not force preemptions soon after.
    decode_headroom: int = 256
    # Host memory that preempted sequences' KVs are swapped out to, so that they resume with
    # exactly what they held instead of being recomputed (0: always recompute). One rank only.
    swap_space: int | str = "4GiB"
    max_kvs_per_pass: int = 1 << 24  # KVs sorted in one compression pass
    max_queue: int | None = None  # waiting requests allowed; None: unbounded
    compression: CompressionParams = field(default_factory=CompressionParams)
    metric: MetricConfig = field(default_factory=MetricConfig)
    # Weights and activations: a torch.dtype or auto/float32/bfloat16/float16 (auto: bfloat16
    # on CUDA, float32 on CPU). Resolved to a torch.dtype by __post_init__.
    dtype: torch.dtype | str = "auto"
    # K/V storage: auto (the model dtype), bfloat16, float16, float32 or fp8 (float8_e4m3fn
    # with a scale per (layer, KV head), see kvcompress/cache/quant.py). Resolved likewise.
    kv_cache_dtype: torch.dtype | str = "auto"
    attention_backend: str = "auto"  # auto (Triton on CUDA), torch or triton
    # Decode steps replay CUDA graphs captured at start (on CUDA with the Triton backend, one
    # rank); True runs every step eagerly.
    enforce_eager: bool = False
    # A oneDNN-blocked copy of every linear weight, which then serves every product: auto (on
    # for float32 on CPU), on or off. Faster steps on CPU (kvcompress/models/parallel.py has
    # the measurements), the weights' memory twice.
    packed_weights: str = "auto"
    device: str = "cpu"
    seed: int = 0
    # Ranks the model is sharded over (torch.distributed: NCCL on CUDA, gloo on CPU), one
    # process each; kv_cache_memory is per rank. Under torchrun, the number of processes.
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        self.kv_cache_memory = parse_size(self.kv_cache_memory)
        self.swap_space = parse_size(self.swap_space, allow_zero=True)
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_kvs_per_pass",
            "tensor_parallel_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.prefill_chunk_size is not None and (
            not isinstance(self.prefill_chunk_size, int) or self.prefill_chunk_size < 1
        ):
            raise ValueError(
                f"prefill_chunk_size must be an integer >= 1, got {self.prefill_chunk_size!r}"
            )
        if self.prefill_compression not in PREFILL_COMPRESSION:
            raise ValueError(
                f"prefill_compression must be one of {PREFILL_COMPRESSION}, "
                f"got {self.prefill_compression!r}"
            )
        if not isinstance(self.decode_headroom, int) or self.decode_headroom < 0:
            raise ValueError(
                f"decode_headroom must be an integer >= 0, got {self.decode_headroom!r}"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_queue is not None and self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        self.dtype = model_dtype(self.dtype, self.device)
        self.kv_cache_dtype = kv_dtype_from_name(self.kv_cache_dtype, self.dtype)
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, "
                f"got {self.attention_backend!r}"
            )
        if self.packed_weights not in PACKED_WEIGHTS:
            raise ValueError(
                f"packed_weights must be one of {PACKED_WEIGHTS}, got {self.packed_weights!r}"
            )
        if self.packed_weights == "on" and not self._can_pack:
            raise ValueError(
                "packed_weights 'on' needs float32 weights on CPU and a torch built with "
                f"oneDNN (got dtype {self.dtype} on {self.device})"
            )
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be a bool, got {self.enforce_eager!r}")
        if not isinstance(self.compression, CompressionParams):
            raise TypeError("compression must be a CompressionParams")

    @property
    def _can_pack(self) -> bool:
        return (
            self.dtype == torch.float32
            and torch.device(self.device).type == "cpu"
            and packing_available()
        )

    @property
    def packs_weights(self) -> bool:
        """Whether the model keeps blocked copies of its weights (``packed_weights``)."""
        return self.packed_weights == "on" or (self.packed_weights == "auto" and self._can_pack)

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether decode steps replay captured CUDA graphs (see engine/cuda_graphs.py)."""
        return (
            not self.enforce_eager
            and torch.device(self.device).type == "cuda"
            and resolve_backend(self.attention_backend, self.device) == "triton"
            and self.tensor_parallel_size == 1
        )

    @property
    def chunk_size(self) -> int:
        """Prompt tokens per prefill chunk: ``prefill_chunk_size``, or 512 on CPU (where
        attention cost grows fastest with the chunk) and 2048 on accelerators."""
        if self.prefill_chunk_size is not None:
            return self.prefill_chunk_size
        return 512 if torch.device(self.device).type == "cpu" else 2048


PACKED_WEIGHTS = ("auto", "on", "off")
PREFILL_COMPRESSION = ("when-needed", "every-chunk")
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dtype(name: torch.dtype | str, device: str | torch.device) -> torch.dtype:
    """The weights' dtype of ``--dtype``: auto is bfloat16 on CUDA, float32 elsewhere."""
    if isinstance(name, torch.dtype):
        if name not in MODEL_DTYPES.values():
            raise ValueError(f"dtype must be one of {list(MODEL_DTYPES.values())}, got {name}")
        return name
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in MODEL_DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from auto, {', '.join(MODEL_DTYPES)}")
    return MODEL_DTYPES[name]
