"""transformers' own implementation holding our weights: the baseline for parity and speed."""

from __future__ import annotations

import torch

from kvcompress.models.config import ModelConfig
from kvcompress.models.llama import LlamaForCausalLM


def to_transformers(model: LlamaForCausalLM, config: ModelConfig) -> torch.nn.Module:
    """A transformers ``*ForCausalLM`` with the same architecture and the very same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling:
        rope = {**config.rope_scaling, "rope_theta": config.rope_theta}
    hf_config = AutoConfig.for_model(
        config.model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        rope_parameters=rope,
        rope_scaling=config.rope_scaling,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=config.attention_bias,
        mlp_bias=config.mlp_bias,
    )
    weight = next(model.parameters())
    hf = AutoModelForCausalLM.from_config(hf_config, dtype=weight.dtype).eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    hf.to(weight.device)
    missing = set(hf.state_dict()) - set(model.state_dict())
    if missing - {"lm_head.weight"}:
        raise ValueError(f"weights missing for transformers' model: {sorted(missing)[:5]}")
    return hf
