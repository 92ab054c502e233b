"""Rotary embeddings: frequencies against transformers, and RoPE's defining property."""

from __future__ import annotations

import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from kvcompress.models.rope import (
    RotaryEmbedding,
    apply_rotary,
    apply_rotary_signed,
    compute_inv_freq,
    signed_sin,
)


def test_llama3_frequencies_match_transformers() -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    hf = LlamaConfig(
        hidden_size=4096, num_attention_heads=32, rope_parameters={**scaling, "rope_theta": 5e5}
    )
    expected, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    assert attention_factor == 1.0
    torch.testing.assert_close(compute_inv_freq(128, 5e5, scaling), expected)


def test_rotation_keeps_norms_and_depends_on_relative_position() -> None:
    torch.manual_seed(0)
    rope = RotaryEmbedding(32, 10000.0, None)
    q, k = torch.randn(1, 3, 32), torch.randn(1, 3, 32)

    def rotated(x: torch.Tensor, pos: int) -> torch.Tensor:
        cos, sin = rope(torch.tensor([pos]), torch.float32)
        return apply_rotary(x, cos, sin)

    torch.testing.assert_close(rotated(q, 17).norm(dim=-1), q.norm(dim=-1))
    score_a = (rotated(q, 10) * rotated(k, 4)).sum(-1)
    score_b = (rotated(q, 106) * rotated(k, 100)).sum(-1)
    torch.testing.assert_close(score_a, score_b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rotated(q, 0), q)


def test_frequencies_stay_float32_whatever_the_output_dtype() -> None:
    rope = RotaryEmbedding(16, 10000.0, None)
    cos, sin = rope(torch.tensor([0, 5000]), torch.bfloat16)
    assert cos.dtype == sin.dtype == torch.bfloat16
    assert rope.inv_freq.dtype == torch.float32


def test_signed_sine_rotation_is_bit_for_bit_the_plain_one() -> None:
    torch.manual_seed(1)
    rope = RotaryEmbedding(32, 10000.0, None)
    x = torch.randn(5, 3, 32)
    cos, sin = rope(torch.tensor([0, 3, 17, 400, 9000]), torch.float32)
    fast = apply_rotary_signed(x, cos.unsqueeze(1), signed_sin(sin).unsqueeze(1))
    assert torch.equal(fast, apply_rotary(x, cos, sin))
