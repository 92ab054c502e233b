"""`ModelConfig`: the few numbers the Llama-family decoder needs, validated once.

Built from a transformers config (`ModelConfig.from_hf`) so that Llama 2/3.x, Mistral,
Qwen2/2.5 and SmolLM2 all arrive in one shape; the decoder never looks at a transformers
object, and the engine reads cache shapes (layers, KV heads, head size) from here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# Architectures that are the same decoder up to biases and rope settings.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})

# Keys each rope scaling type needs besides "rope_type".
ROPE_SCALING_KEYS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def normalize_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """A rope scaling dict in one form: None for plain RoPE, else a copy keyed by "rope_type".

    transformers spells the type "type" in old configs and "rope_type" in new ones, and v5
    folds ``rope_theta`` into the same dict; both are accepted here.
    """
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be None or a dict, got {type(scaling).__name__}")
    out = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")}
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type is None:
        raise ValueError(f"rope_scaling has no 'rope_type': {scaling!r}")
    if rope_type == "default":
        return None
    if rope_type not in ROPE_SCALING_KEYS:
        raise ValueError(
            f"unsupported rope scaling {rope_type!r}; supported: default, "
            + ", ".join(sorted(ROPE_SCALING_KEYS))
        )
    missing = [k for k in ROPE_SCALING_KEYS[rope_type] if out.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} lacks {', '.join(missing)}")
    out["rope_type"] = rope_type
    partial = out.get("partial_rotary_factor", 1.0)
    if partial not in (None, 1.0):
        raise ValueError(f"partial rotary embeddings are not supported (factor {partial})")
    return out


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # None, or {"rope_type": "linear"|"llama3", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2, some Llamas)
    attention_out_bias: bool = False  # bias on o_proj (Llama with attention_bias=True)
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    model_type: str = "llama"

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not math.isfinite(self.rms_norm_eps) or self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not math.isfinite(self.rope_theta) or self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        self.rms_norm_eps = float(self.rms_norm_eps)
        self.rope_theta = float(self.rope_theta)
        self.rope_scaling = normalize_rope_scaling(self.rope_scaling)
        if self.bos_token_id is not None and not 0 <= self.bos_token_id < self.vocab_size:
            raise ValueError(f"bos_token_id {self.bos_token_id} outside [0, {self.vocab_size})")
        ids = _as_id_list(self.eos_token_ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"eos_token_ids {bad} outside [0, {self.vocab_size})")
        self.eos_token_ids = list(dict.fromkeys(ids))  # de-duplicated, order kept
        if not self.model_type:
            raise ValueError("model_type must be a non-empty string")

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, cfg: Any) -> ModelConfig:
        """From a transformers ``PretrainedConfig`` of a supported Llama-family model."""
        model_type = getattr(cfg, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model type {model_type!r}; supported: "
                + ", ".join(sorted(SUPPORTED_MODEL_TYPES))
            )
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"only SiLU-gated MLPs are supported, this model uses {act!r}")

        num_heads = cfg.num_attention_heads
        num_kv_heads = getattr(cfg, "num_key_value_heads", None) or num_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        rope_theta, rope_scaling = _rope_from_hf(cfg)

        max_pos = cfg.max_position_embeddings
        sliding = _sliding_window(cfg)
        if sliding is not None and sliding < max_pos:
            # The decoder attends densely; beyond the window it would no longer match the
            # model's training, so the context is capped where the two agree.
            logger.warning(
                "%s uses sliding-window attention (%d); capping the context at %d tokens",
                model_type,
                sliding,
                sliding,
            )
            max_pos = sliding

        if model_type == "qwen2":
            # Qwen2 always has q/k/v biases and never an o_proj bias.
            qkv_bias, out_bias = True, False
        else:
            qkv_bias = out_bias = bool(getattr(cfg, "attention_bias", False))

        return cls(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            attention_out_bias=out_bias,
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
            bos_token_id=getattr(cfg, "bos_token_id", None),
            eos_token_ids=_as_id_list(getattr(cfg, "eos_token_id", None)),
            model_type=model_type,
        )


def _rope_from_hf(cfg: Any) -> tuple[float, dict[str, Any] | None]:
    # transformers >= 5 keeps theta and scaling together in `rope_parameters`; older
    # versions have `rope_theta` and `rope_scaling` attributes.
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and params:
        if "rope_type" not in params and all(isinstance(v, dict) for v in params.values()):
            raise ValueError("per-layer-type rope parameters are not supported")
        theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        return float(theta), normalize_rope_scaling(params if "rope_type" in params else None)
    theta = getattr(cfg, "rope_theta", None) or 10000.0
    return float(theta), normalize_rope_scaling(getattr(cfg, "rope_scaling", None))


def _sliding_window(cfg: Any) -> int | None:
    window = getattr(cfg, "sliding_window", None)
    if window is None:
        return None
    # Qwen2 carries a window in its config but only uses it when this flag is set.
    if getattr(cfg, "model_type", None) == "qwen2" and not getattr(
        cfg, "use_sliding_window", False
    ):
        return None
    return int(window)
