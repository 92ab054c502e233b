"""Engines on the real default model (SmolLM2-135M-Instruct from its GGUF)."""

from __future__ import annotations

import pytest
import torch

from kvcompress.engine import EngineConfig, LLMEngine
from kvcompress.eval.texts import pydoc_text


def make_engine(**kwargs) -> LLMEngine:
    return LLMEngine(EngineConfig(**kwargs))


@pytest.fixture(scope="session")
def engine() -> LLMEngine:
    """A roomy engine with compression off by default."""
    return make_engine(kv_cache_memory="256MiB", max_num_seqs=16)


@pytest.fixture(scope="session")
def hf_default_model(engine):
    """transformers' own Llama implementation holding the very same weights."""
    return engine.to_transformers()


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def prose_ids(engine: LLMEngine, n: int, offset: int = 0) -> list[int]:
    """``n`` token ids of natural text (CPython's pydoc topics), from a character offset."""
    ids = engine.tokenizer(pydoc_text()[offset : offset + 8 * n], add_special_tokens=False)
    return ids["input_ids"][:n]
