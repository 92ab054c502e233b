"""GGUF reading on small files written here with gguf.GGUFWriter, as llama.cpp would."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, Qwen2Config
from transformers import LlamaForCausalLM as HFLlama
from transformers import Qwen2ForCausalLM as HFQwen2

from kvcompress.models import LlamaForCausalLM, ModelConfig
from kvcompress.models.gguf_weights import hf_name, infer_llama3_scaling, permute_qk, unpermute_qk
from kvcompress.models.loader import build_model, read_gguf
from kvcompress.models.rope import compute_inv_freq

from .conftest import DenseCausalBackend, full_logits

# HF name fragment -> GGUF name fragment, as llama.cpp's converter writes them.
_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, restated in numpy.
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_name(name: str) -> str:
    base, kind = name.rsplit(".", 1)
    if base == "model.embed_tokens":
        return f"token_embd.{kind}"
    if base == "model.norm":
        return f"output_norm.{kind}"
    if base == "lm_head":
        return f"output.{kind}"
    _, _, layer, rest = base.split(".", 3)
    return f"blk.{layer}.{_TO_GGUF[rest]}.{kind}"


def write_gguf(path: Path, hf: Any, arch: str, rope_freqs: torch.Tensor | None = None) -> None:
    cfg = hf.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    state = hf.state_dict()
    for name, tensor in state.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes no output tensor for tied models
        array = tensor.detach().float().numpy().copy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, cfg.num_key_value_heads)
        writer.add_tensor(gguf_name(name), array)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def random_hf(cls: Any, cfg: Any) -> Any:
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.15))
    return hf


SMALL = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=80,
    num_hidden_layers=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    w = torch.randn(6 * 8, 5)
    permuted = torch.from_numpy(llama_cpp_permute(w.numpy(), 6))
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_qk(permuted, 6), w)
    assert torch.equal(permute_qk(w, 6), permuted)


def test_unpermute_agrees_with_transformers_gguf_helper() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.random.default_rng(0).standard_normal((4 * 16, 12)).astype(np.float32)
    proc = LlamaTensorProcessor(config={"num_attention_heads": 8, "num_key_value_heads": 4})
    theirs = proc.process(w, "blk.0.attn_k.weight").weights
    ours = unpermute_qk(torch.from_numpy(w), 4).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_tensor_names_map_to_hugging_face_names() -> None:
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    assert hf_name("blk.12.attn_q.bias") == "model.layers.12.self_attn.q_proj.bias"
    assert hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_name("blk.0.attn_norm.weight") == "model.layers.0.input_layernorm.weight"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("blk.0.ffn_gate_exps.weight") is None
    assert hf_name("rope_freqs.weight") is None


def _check_gguf_logits(path: Path, hf: Any) -> ModelConfig:
    hf_config, state = read_gguf(path)
    config = ModelConfig.from_hf(hf_config)
    ours = build_model(config, state, DenseCausalBackend())
    ids = torch.randint(0, config.vocab_size, (40,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = hf(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(full_logits(ours, ids), expected, atol=1e-4, rtol=1e-4)
    return config


def test_llama_gguf_round_trip_matches_transformers(tmp_path: Path) -> None:
    cfg = LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2)
    hf = random_hf(HFLlama, cfg)
    path = tmp_path / "tiny-llama.gguf"
    write_gguf(path, hf, "llama")
    config = _check_gguf_logits(path, hf)
    assert not config.tie_word_embeddings  # an output tensor was written
    assert config.num_kv_heads == 2


def test_qwen2_gguf_is_not_unpermuted_and_keeps_biases(tmp_path: Path) -> None:
    cfg = Qwen2Config(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
    )
    hf = random_hf(HFQwen2, cfg)
    path = tmp_path / "tiny-qwen2.gguf"
    write_gguf(path, hf, "qwen2")
    config = _check_gguf_logits(path, hf)
    assert config.tie_word_embeddings  # no output tensor -> tied
    assert config.attention_bias


def test_llama31_rope_freqs_tensor_becomes_llama3_scaling(tmp_path: Path) -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = LlamaConfig(
        **SMALL,
        num_attention_heads=4,
        num_key_value_heads=4,
        rope_parameters={**scaling, "rope_theta": 500000.0},
    )
    hf = random_hf(HFLlama, cfg)
    head_dim = 16
    # What llama.cpp stores: the divisor applied to each plain RoPE frequency.
    freqs = compute_inv_freq(head_dim, 500000.0, None) / compute_inv_freq(
        head_dim, 500000.0, scaling
    )
    assert freqs.max() > 1.5  # the scaling really changes some frequencies
    path = tmp_path / "tiny-llama31.gguf"
    write_gguf(path, hf, "llama", rope_freqs=freqs)
    config = _check_gguf_logits(path, hf)
    assert config.rope_scaling == scaling


def test_unknown_rope_freqs_are_refused() -> None:
    with pytest.raises(ValueError, match="rope_freqs"):
        infer_llama3_scaling(torch.full((8,), 3.0), 16, 500000.0)


def test_unsupported_gguf_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        read_gguf(path)


def test_build_model_reports_missing_and_unexpected_weights() -> None:
    config = ModelConfig(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=8,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
    )
    state = LlamaForCausalLM(config).state_dict()
    with pytest.raises(ValueError, match=re.escape("not used by this model: extra.weight")):
        build_model(config, {**state, "extra.weight": torch.zeros(1)})
    del state["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(
        ValueError, match=re.escape("missing from the checkpoint: model.layers.0.mlp.up_proj")
    ):
        build_model(config, state)
