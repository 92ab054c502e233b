"""Decoder building blocks that take faster paths must compute exactly what they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvcompress.models import ModelConfig, pack_linear_weights, packing_available
from kvcompress.models.llama import LlamaForCausalLM, RMSNorm
from kvcompress.models.parallel import Linear

from .test_config import BASE


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


@pytest.mark.skipif(not packing_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 4, 12, 64, 513])
def test_packed_linear_computes_the_dense_product(rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    linear = Linear(96, 200, bias=bias)
    x = torch.randn(rows, 96)
    with torch.inference_mode():
        dense = linear(x)
        state = dict(linear.state_dict())
        linear.pack_weight()
        packed = linear(x)
        torch.testing.assert_close(packed, dense, atol=1e-5, rtol=1e-5)
        # The blocked copy stays out of the state dict, which still holds the dense weight.
        assert linear.state_dict().keys() == state.keys()
        assert torch.equal(linear.state_dict()["weight"], state["weight"])


@pytest.mark.skipif(not packing_available(), reason="torch built without oneDNN")
def test_packing_a_model_packs_every_linear_and_keeps_its_logits() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(**BASE, tie_word_embeddings=True))
    hidden = torch.randn(6, BASE["hidden_size"])
    with torch.inference_mode():
        dense = model.compute_logits(hidden)
        pack_linear_weights(model)
        linears = [m for m in model.modules() if isinstance(m, Linear)]
        assert len(linears) == 2 * 7 + 1 and all(m.packed_weight is not None for m in linears)
        torch.testing.assert_close(model.compute_logits(hidden), dense, atol=1e-5, rtol=1e-5)
