"""Decoder building blocks that take faster paths must compute exactly what they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvcompress.models.llama import RMSNorm


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm, operation for operation."""
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_float32_rms_norm_is_bit_for_bit_the_explicit_one(rows: int) -> None:
    torch.manual_seed(rows)
    norm = RMSNorm(576, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576))
    x = torch.randn(rows, 576) * 3
    with torch.inference_mode():
        assert torch.equal(norm(x), reference_rms_norm(x, norm.weight, 1e-5))


def test_in_place_gating_is_bit_for_bit_the_plain_one() -> None:
    torch.manual_seed(0)
    g, u = torch.randn(5, 96), torch.randn(5, 96)
    expected = F.silu(g) * u
    assert torch.equal(F.silu(g.clone(), inplace=True).mul_(u), expected)
