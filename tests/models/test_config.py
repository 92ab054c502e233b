"""ModelConfig: construction from transformers configs and validation."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from kvcompress.models import ModelConfig
from kvcompress.models.config import normalize_rope_scaling

BASE: dict[str, Any] = dict(
    vocab_size=100,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
)


def test_llama31_config() -> None:
    hf = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        eos_token_id=[128001, 128008, 128009],
        bos_token_id=128000,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    cfg = ModelConfig.from_hf(hf)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (32, 8, 128)
    assert cfg.num_queries_per_kv == 4
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "llama3"
    assert cfg.rope_scaling["factor"] == 8.0
    assert cfg.eos_token_ids == [128001, 128008, 128009]
    assert cfg.bos_token_id == 128000
    assert cfg.max_position_embeddings == 131072
    assert not cfg.attention_bias and not cfg.tie_word_embeddings


def test_qwen2_has_qkv_bias_and_no_eos_by_default() -> None:
    cfg = ModelConfig.from_hf(
        Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    )
    assert cfg.attention_bias and not cfg.attention_out_bias
    assert cfg.head_dim == 16
    assert cfg.model_type == "qwen2"
    assert cfg.eos_token_ids == []


def test_llama_attention_bias_covers_o_proj() -> None:
    cfg = ModelConfig.from_hf(
        LlamaConfig(hidden_size=64, num_attention_heads=4, attention_bias=True, vocab_size=50)
    )
    assert cfg.attention_bias and cfg.attention_out_bias
    assert cfg.num_kv_heads == 4  # MHA when no KV head count is given


def test_mistral_sliding_window_caps_the_context() -> None:
    hf = MistralConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=50,
        max_position_embeddings=32768,
        sliding_window=4096,
    )
    assert ModelConfig.from_hf(hf).max_position_embeddings == 4096
    hf.sliding_window = None
    assert ModelConfig.from_hf(hf).max_position_embeddings == 32768


def test_unsupported_models_are_refused() -> None:
    hf = LlamaConfig(hidden_size=64, num_attention_heads=4, vocab_size=50)
    hf.model_type = "gpt2"
    with pytest.raises(ValueError, match="unsupported model type 'gpt2'"):
        ModelConfig.from_hf(hf)
    hf = LlamaConfig(hidden_size=64, num_attention_heads=4, vocab_size=50, hidden_act="gelu")
    with pytest.raises(ValueError, match="SiLU"):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_kv_heads": 3}, "multiple of num_kv_heads"),
        ({"head_dim": 15}, "head_dim must be even"),
        ({"num_layers": 0}, "num_layers must be an integer >= 1"),
        ({"vocab_size": 2.5}, "vocab_size must be an integer"),
        ({"hidden_size": True}, "hidden_size must be an integer"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
        ({"rope_theta": -1.0}, "rope_theta"),
        ({"eos_token_ids": [5, 100]}, r"eos_token_ids \[100\]"),
        ({"bos_token_id": -1}, "bos_token_id"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope scaling 'yarn'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks low_freq_factor"),
        ({"rope_scaling": {"factor": 8.0}}, "no 'rope_type'"),
        ({"rope_scaling": "linear"}, "must be None or a dict"),
        ({"model_type": ""}, "model_type"),
    ],
)
def test_validation(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**BASE, **change})


def test_normalisation() -> None:
    cfg = ModelConfig(**BASE, eos_token_ids=[3, 3, 4], rope_scaling={"rope_type": "default"})
    assert cfg.eos_token_ids == [3, 4]
    assert cfg.rope_scaling is None
    legacy = normalize_rope_scaling({"type": "linear", "factor": 2.0, "rope_theta": 1.0})
    assert legacy == {"rope_type": "linear", "factor": 2.0}
    # A config survives a round trip through a plain dict (as the converted-model cache does).
    assert ModelConfig(**dataclasses.asdict(cfg)) == cfg
