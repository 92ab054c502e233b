"""Rotary position embeddings in the rotate-half convention of transformers' Llama.

The frequency of pair ``i`` (dimensions ``i`` and ``i + head_dim / 2``) is
``theta ** (-2i / head_dim)``, optionally rescaled ("linear" or Llama 3's "llama3" scaling).
Positions come per token (flat layout), so cos/sin are computed per step from the
positions rather than read from a table sized for the whole context: a 128k-token table
would cost more memory than the small models here.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """``[head_dim // 2]`` float32 inverse frequencies of plain RoPE."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    return 1.0 / (theta**exponents)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by ``factor``, short ones kept, and a
    smooth blend in between, so that the original context's local detail survives."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])

    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq

    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_between = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_between, blended, scaled)


def compute_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = default_inv_freq(head_dim, theta)
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"unsupported rope scaling {kind!r}")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [N, heads, head_dim]`` rotated by ``cos``/``sin [N, head_dim]`` (all heads alike)."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with its first half negated: folds ``rotate_half``'s negation into the table."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rotary_signed(
    x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor
) -> torch.Tensor:
    """:func:`apply_rotary` with tables built once per step (``[N, 1, head_dim]``, the sine
    from :func:`signed_sin`): one op fewer per call, bit for bit the same result, since
    ``(-a) * b == a * (-b)`` exactly."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return x * cos + swapped * sin_signed


class RotaryEmbedding:
    """cos/sin for a batch of positions.

    Not an ``nn.Module`` buffer on purpose: ``model.to(torch.bfloat16)`` would round the
    frequencies, and positions in the thousands would then drift. The float32 frequencies
    are kept here and copied once per device.
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None) -> None:
        self.head_dim = head_dim
        self._inv_freq = compute_inv_freq(head_dim, theta, scaling)
        self._per_device: dict[torch.device, torch.Tensor] = {}

    @property
    def inv_freq(self) -> torch.Tensor:
        return self._inv_freq

    def _on(self, device: torch.device) -> torch.Tensor:
        inv = self._per_device.get(device)
        if inv is None:
            inv = self._per_device[device] = self._inv_freq.to(device)
        return inv

    def __call__(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin [N, head_dim]`` in ``dtype`` for ``positions [N]``; angles in float32."""
        inv = self._on(positions.device)
        angles = positions.to(torch.float32)[:, None] * inv[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)
