"""KV storage dtypes, and fp8 (float8_e4m3fn) with one scale per (layer, KV head).

Scale policy: a (layer, KV head)'s scale is fixed by the first write to that layer (the
first prefill), at ``HEADROOM * amax / FP8_MAX``, and never changes afterwards. A scale that
grew later would need every stored KV of the head re-quantised (or a scale per block), and a
scale per token would cost metadata bytes per KV, which is what fp8 saves. Keys and values
after RoPE have stable per-head ranges (the outlier channels are the head's, not the
prompt's), so the first prompt's range with 2x headroom covers later ones; values beyond it
saturate at +-FP8_MAX * scale instead of overflowing to NaN.

Round trip: within range, e4m3's 3 mantissa bits give a relative error of at most 2**-4
(round to nearest), and the subnormals an absolute error of at most 2**-10 * scale.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
HEADROOM = 2.0  # the first write's amax maps to FP8_MAX / HEADROOM
KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16, FP8)
# Names accepted by --kv-cache-dtype ("auto": the model's dtype).
KV_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp8": FP8,
}


def kv_dtype_from_name(name: str | torch.dtype, model_dtype: torch.dtype) -> torch.dtype:
    """The storage dtype of ``--kv-cache-dtype`` (``"auto"``: the model's own)."""
    if isinstance(name, torch.dtype):
        dtype = name
    elif name == "auto":
        dtype = model_dtype
    elif name in KV_DTYPE_NAMES:
        dtype = KV_DTYPE_NAMES[name]
    else:
        choices = ", ".join(["auto", *KV_DTYPE_NAMES])
        raise ValueError(f"unknown KV cache dtype {name!r}; choose from {choices}")
    if dtype not in KV_DTYPES:
        raise ValueError(f"KV cache dtype must be one of {KV_DTYPES}, got {dtype}")
    return dtype


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8


def first_scale(x: torch.Tensor) -> torch.Tensor:
    """``[H]`` fp32 scale of a first write ``x [N, H, D]`` (N > 0)."""
    amax = x.detach().abs().amax(dim=(0, 2)).float()
    # An all-zero head still gets a usable (tiny) scale rather than a division by zero.
    return amax.clamp_min(1e-12) * (HEADROOM / FP8_MAX)


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [N, H, D]`` as fp8 with per-head ``scale [H]``; saturates outside the range."""
    scaled = x.float() / scale.view(1, -1, 1)
    return scaled.clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize(
    x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """fp8 ``x [..., H, W, D]`` back to ``dtype`` with per-head ``scale [H]`` (into ``out``,
    of ``x``'s shape, if given)."""
    scale = scale.view(-1, 1, 1).to(dtype)
    if out is None:
        return x.to(dtype) * scale
    return out.copy_(x).mul_(scale)


def copyable(pool: torch.Tensor) -> torch.Tensor:
    """A view of a pool that ``index_copy_`` accepts on every device: fp8 as its bytes (the
    CPU build has no fp8 ``index_copy_``); a copy of bytes is a copy of the values."""
    return pool.view(torch.uint8) if is_fp8(pool.dtype) else pool
