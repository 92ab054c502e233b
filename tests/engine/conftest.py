"""Engines on the real default model (SmolLM2-135M-Instruct from its GGUF)."""

from __future__ import annotations

import pytest
import torch

from kvcompress.engine import EngineConfig, LLMEngine


def make_engine(**kwargs) -> LLMEngine:
    return LLMEngine(EngineConfig(**kwargs))


@pytest.fixture(scope="session")
def engine() -> LLMEngine:
    """A roomy engine with compression off by default."""
    return make_engine(kv_cache_memory="256MiB", max_num_seqs=16)


@pytest.fixture(scope="session")
def hf_default_model(engine):
    """transformers' own Llama implementation holding the very same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    mc = engine.model_config
    config = LlamaConfig(
        vocab_size=mc.vocab_size,
        hidden_size=mc.hidden_size,
        intermediate_size=mc.intermediate_size,
        num_hidden_layers=mc.num_layers,
        num_attention_heads=mc.num_heads,
        num_key_value_heads=mc.num_kv_heads,
        head_dim=mc.head_dim,
        rms_norm_eps=mc.rms_norm_eps,
        rope_theta=mc.rope_theta,
        max_position_embeddings=mc.max_position_embeddings,
        tie_word_embeddings=mc.tie_word_embeddings,
    )
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(engine.runner.model.state_dict())
    return model


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()
