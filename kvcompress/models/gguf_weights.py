"""GGUF tensors -> a Hugging Face-named float state dict for the Llama-family decoder.

Two GGUF quirks matter here:

* llama.cpp's converter reorders the rows of ``attn_q`` and ``attn_k`` for the "llama"
  architecture (Llama, Mistral, SmolLM2): within each head, HF checkpoints pair dimension
  ``i`` with ``i + d/2`` for RoPE (rotate-half), while llama.cpp pairs ``2i`` with ``2i+1``
  (the original Meta layout). The rows must be put back or attention is silently wrong.
  Qwen2 GGUFs are written without that reordering.
* Llama 3.1/3.2 GGUFs carry their rope scaling as a ``rope_freqs`` tensor (a divisor per
  frequency) instead of metadata; `infer_llama3_scaling` turns it back into the config.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvcompress.models.rope import compute_inv_freq

# GGUF architectures whose q/k rows llama.cpp permutes; both map onto our decoder.
PERMUTED_ARCHS = frozenset({"llama"})
SUPPORTED_ARCHS = frozenset({"llama", "qwen2"})

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Tensors that carry no weights of ours: rope_freqs is read separately (see module doc).
_SKIPPED = frozenset({"rope_freqs.weight"})
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str | None:
    """The HF parameter name of a GGUF tensor, or None for one the decoder does not use."""
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match:
        layer, part, kind = match.groups()
        mapped = _BLOCK_NAMES.get(part)
        return None if mapped is None else f"model.layers.{layer}.{mapped}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    mapped = _GLOBAL_NAMES.get(base)
    return None if mapped is None or kind not in ("weight", "bias") else f"{mapped}.{kind}"


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's rope row order for a q or k projection ``[heads * d, in]``.

    llama.cpp stored, per head, rows ``(half, pair)`` -> ``(pair, half)`` interleaved; reading
    them as ``[heads, d/2, 2]`` and swapping the last two axes restores the HF order.
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"cannot split {rows} rows into {num_heads} rotary heads")
    rest = weight.shape[1:]
    w = weight.reshape(num_heads, rows // num_heads // 2, 2, *rest)
    return w.transpose(1, 2).reshape(weight.shape).contiguous()


def permute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's reordering (the inverse of `unpermute_qk`); used to test the round trip."""
    rows = weight.shape[0]
    rest = weight.shape[1:]
    w = weight.reshape(num_heads, 2, rows // num_heads // 2, *rest)
    return w.transpose(1, 2).reshape(weight.shape).contiguous()


def open_gguf(path: str | Path) -> Any:
    from gguf import GGUFReader

    return GGUFReader(str(path))


def read_field(reader: Any, key: str) -> Any:
    """A scalar or string metadata value, or None when absent."""
    field = reader.fields.get(key)
    if field is None:
        return None
    if hasattr(field, "contents"):  # gguf >= 0.11
        return field.contents()
    # Older gguf: a scalar or a string is the single part that `data` points at.
    from gguf import GGUFValueType

    part = field.parts[field.data[0]]
    if field.types and field.types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return part.tolist()[0]


def architecture(reader: Any) -> str:
    arch = read_field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        supported = ", ".join(sorted(SUPPORTED_ARCHS))
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {supported}")
    return arch


def read_state_dict(
    reader: Any, num_heads: int, num_kv_heads: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Dequantised float32 tensors under HF names, and the ``rope_freqs`` tensor if any."""
    from gguf.quants import dequantize

    permuted = architecture(reader) in PERMUTED_ARCHS
    state: dict[str, torch.Tensor] = {}
    rope_freqs: torch.Tensor | None = None
    unknown: list[str] = []
    for tensor in reader.tensors:
        # dequantize returns numpy in row-major HF order ([out, in] for linear layers).
        array = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        value = torch.from_numpy(array.copy())  # own the memory: the reader's is a memmap
        if tensor.name == "rope_freqs.weight":
            rope_freqs = value
            continue
        if tensor.name in _SKIPPED:
            continue
        name = hf_name(tensor.name)
        if name is None:
            unknown.append(tensor.name)
            continue
        if permuted and name.endswith("self_attn.q_proj.weight"):
            value = unpermute_qk(value, num_heads)
        elif permuted and name.endswith("self_attn.k_proj.weight"):
            value = unpermute_qk(value, num_kv_heads)
        state[name] = value
    if unknown:
        raise ValueError(f"GGUF tensors this decoder does not know: {', '.join(unknown[:8])}")
    return state, rope_freqs


def rope_scaling_from_metadata(reader: Any) -> dict[str, Any] | None:
    """Linear rope scaling as stored in GGUF metadata (``{arch}.rope.scaling.*``), if any."""
    arch = read_field(reader, "general.architecture")
    kind = read_field(reader, f"{arch}.rope.scaling.type")
    factor = read_field(reader, f"{arch}.rope.scaling.factor")
    if kind == "linear" and factor and float(factor) != 1.0:
        return {"rope_type": "linear", "factor": float(factor)}
    return None


# Llama 3.1 (8B-405B) and 3.2 (1B, 3B) use these; the tensor is checked against them.
_LLAMA3_FACTORS = (8.0, 16.0, 32.0)


def infer_llama3_scaling(rope_freqs: torch.Tensor, head_dim: int, theta: float) -> dict[str, Any]:
    """The llama3 rope scaling whose frequency divisors equal ``rope_freqs``.

    llama.cpp divides each plain frequency by ``rope_freqs[i]``; Llama 3's published settings
    are tried and the one reproducing the tensor wins. Anything else is refused rather than
    guessed.
    """
    plain = compute_inv_freq(head_dim, theta, None)
    if rope_freqs.shape != plain.shape:
        raise ValueError(
            f"rope_freqs has shape {tuple(rope_freqs.shape)}, expected {tuple(plain.shape)}"
        )
    for factor in _LLAMA3_FACTORS:
        scaling = {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
        divisors = plain / compute_inv_freq(head_dim, theta, scaling)
        if torch.allclose(divisors, rope_freqs.float(), rtol=1e-4, atol=1e-4):
            return scaling
    raise ValueError("the GGUF's rope_freqs tensor matches no known Llama 3 rope scaling")
