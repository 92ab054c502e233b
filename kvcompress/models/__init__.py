"""Llama-family decoder on the flat token layout, and local weight loading (HF, GGUF)."""

from kvcompress.models.config import ModelConfig
from kvcompress.models.llama import LlamaForCausalLM
from kvcompress.models.loader import (
    LoadedModel,
    ModelLoadError,
    default_model_path,
    load_config,
    load_model,
)
from kvcompress.models.parallel import pack_linear_weights, packing_available

__all__ = [
    "LlamaForCausalLM",
    "LoadedModel",
    "ModelConfig",
    "ModelLoadError",
    "default_model_path",
    "load_config",
    "load_model",
    "pack_linear_weights",
    "packing_available",
]
