"""Our decoder against transformers' own implementations, on small random models."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import (
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)
from transformers import (
    LlamaForCausalLM as HFLlama,
)
from transformers import (
    MistralForCausalLM as HFMistral,
)
from transformers import (
    Qwen2ForCausalLM as HFQwen2,
)

from kvcompress.models import LlamaForCausalLM, ModelConfig

from .conftest import DenseCausalBackend, full_logits

SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


def _llama_gqa_llama3() -> Any:
    # GQA, biases everywhere, head_dim != hidden / heads, and Llama 3.1 rope scaling with a
    # short "original" context so that all three frequency bands occur.
    cfg = LlamaConfig(
        **SMALL,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        attention_bias=True,
        mlp_bias=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    return HFLlama(cfg)


def _llama_mha_linear_tied() -> Any:
    cfg = LlamaConfig(
        **SMALL,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    )
    return HFLlama(cfg)


def _mistral_gqa() -> Any:
    cfg = MistralConfig(**SMALL, num_attention_heads=8, num_key_value_heads=2, sliding_window=None)
    return HFMistral(cfg)


def _mistral_mha() -> Any:
    cfg = MistralConfig(**SMALL, num_attention_heads=4, num_key_value_heads=4, sliding_window=None)
    return HFMistral(cfg)


def _qwen2_gqa_tied() -> Any:
    cfg = Qwen2Config(
        **SMALL,
        num_attention_heads=4,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    return HFQwen2(cfg)


BUILDERS = {
    "llama-gqa-llama3-bias": _llama_gqa_llama3,
    "llama-mha-linear-tied": _llama_mha_linear_tied,
    "mistral-gqa": _mistral_gqa,
    "mistral-mha": _mistral_mha,
    "qwen2-gqa-bias-tied": _qwen2_gqa_tied,
}


def _random_hf(name: str) -> Any:
    torch.manual_seed(0)
    hf = BUILDERS[name]().eval()
    # Default init (std 0.02, unit norms) gives near-zero logits that match trivially;
    # larger random weights make every component, norms and biases included, count.
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.15))
        if hf.config.tie_word_embeddings:
            assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return hf


def _ours(hf: Any, backend: Any = None) -> LlamaForCausalLM:
    ours = LlamaForCausalLM(ModelConfig.from_hf(hf.config), backend or DenseCausalBackend())
    ours.load_state_dict(hf.state_dict())
    return ours.eval()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_logits_match_transformers(name: str) -> None:
    hf = _random_hf(name)
    ours = _ours(hf)
    gen = torch.Generator().manual_seed(1)
    n = 80  # past the llama3 case's "original" context of 64
    ids = torch.randint(0, hf.config.vocab_size, (n,), generator=gen)
    offset = 7  # positions need not start at 0 (as for a continued sequence)
    positions = torch.arange(n) + offset
    with torch.inference_mode():
        expected = hf(input_ids=ids[None], position_ids=positions[None]).logits[0]
        hidden = ours(ids, positions, meta=None)
        got = ours.compute_logits(hidden)
    assert got.shape == (n, hf.config.vocab_size)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert expected.abs().max() > 1.0  # the comparison is not trivially between zeros


def test_tied_embeddings_share_storage() -> None:
    ours = _ours(_random_hf("qwen2-gqa-bias-tied"))
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert ours.config.attention_bias and not ours.config.attention_out_bias
    assert ours.model.layers[0].self_attn.q_proj.bias is not None
    assert ours.model.layers[0].self_attn.o_proj.bias is None


def test_parameter_names_are_hugging_face_names() -> None:
    hf = _random_hf("llama-gqa-llama3-bias")
    ours = _ours(hf)
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert "model.layers.2.self_attn.q_proj.weight" in ours.state_dict()


class RecordingBackend(DenseCausalBackend):
    def __init__(self) -> None:
        super().__init__()
        self.metas: list[Any] = []
        self.shapes: list[tuple[tuple[int, ...], ...]] = []

    def forward(self, layer, q, k, v, meta):  # type: ignore[no-untyped-def]
        self.metas.append(meta)
        self.shapes.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return super().forward(layer, q, k, v, meta)


def test_backend_called_once_per_layer_with_meta_untouched() -> None:
    backend = RecordingBackend()
    hf = _random_hf("mistral-gqa")
    ours = _ours(hf, backend)
    meta = object()
    ours(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]), meta)
    assert backend.calls == [0, 1, 2]
    assert all(m is meta for m in backend.metas)
    # [N, heads, head_dim] with 8 query heads and 2 KV heads of size 64 / 8.
    assert backend.shapes[0] == ((3, 8, 8), (3, 2, 8), (3, 2, 8))


def test_forward_without_backend_or_bad_shapes_fails_clearly() -> None:
    ours = _ours(_random_hf("mistral-mha"))
    ours.set_attention_backend(None)
    with pytest.raises(RuntimeError, match="attention backend"):
        ours(torch.tensor([1]), torch.tensor([0]), None)
    ours.set_attention_backend(DenseCausalBackend())
    with pytest.raises(ValueError, match="flat layout"):
        ours(torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), None)


def test_backend_module_is_not_registered_as_submodule() -> None:
    class ModuleBackend(torch.nn.Module, DenseCausalBackend):
        def __init__(self) -> None:
            torch.nn.Module.__init__(self)
            DenseCausalBackend.__init__(self)
            self.big = torch.nn.Parameter(torch.zeros(3))

        forward = DenseCausalBackend.forward

    hf = _random_hf("mistral-mha")
    ours = _ours(hf, ModuleBackend())
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert isinstance(ours.attention_backend, ModuleBackend)


def test_bfloat16_runs_with_float32_logits() -> None:
    hf = _random_hf("llama-mha-linear-tied")
    ours = LlamaForCausalLM(
        ModelConfig.from_hf(hf.config), DenseCausalBackend(), dtype=torch.bfloat16
    )
    ours.load_state_dict(hf.state_dict())
    ids = torch.arange(10)
    hidden = ours(ids, torch.arange(10), None)
    assert hidden.dtype == torch.bfloat16
    logits = ours.compute_logits(hidden)
    assert logits.dtype == torch.float32
    expected = full_logits(_ours(hf), ids)
    # bf16 keeps ~3 significant digits; the top choices should mostly survive.
    agree = (logits.argmax(-1) == expected.argmax(-1)).float().mean()
    assert agree >= 0.7
