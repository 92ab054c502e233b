"""The Llama-family decoder (Llama 2/3.x, Mistral, Qwen2, SmolLM2) on the flat token layout.

A step is ``N`` tokens from any number of sequences, with no batch dimension and no
padding. Everything that depends on which sequence a token belongs to (the KV cache,
causal masks) happens in the attention backend, which receives an opaque ``meta`` object
from the caller; this module only knows each token's id and position.

Parameter names are those of Hugging Face checkpoints so that their state dicts load as is.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kvcompress.attention.backend import AttentionBackend
from kvcompress.models.config import ModelConfig
from kvcompress.models.parallel import Linear, RowParallelLinear, ShardLayout, TensorParallel
from kvcompress.models.rope import RotaryEmbedding, apply_rotary_signed, signed_sin

FactoryKwargs = dict[str, Any]


class Shard(NamedTuple):
    tp: TensorParallel
    layout: ShardLayout


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        if not self.weight.is_meta:  # see Linear
            super().reset_parameters()


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, **factory: Any) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, **factory))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            # torch's own kernel: the same operations in the same order (bit for bit, tested),
            # in one call instead of five.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in float32 (half-precision squares overflow), scale in the input dtype,
        # in the same order as transformers so that logits agree bit for bit in float32.
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, shard: Shard, factory: FactoryKwargs) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, len(shard.layout.intermediate), config.mlp_bias
        self.gate_proj = Linear(h, i, bias=bias, **factory)
        self.up_proj = Linear(h, i, bias=bias, **factory)
        self.down_proj = RowParallelLinear(i, h, bias=bias, tp=shard.tp, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place on the gate's output: two fewer [tokens, intermediate] temporaries, the
        # largest of the layer (fresh large buffers page-fault on CPU).
        h = F.silu(self.gate_proj(x), inplace=True)
        return self.down_proj(h.mul_(self.up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(
        self, config: ModelConfig, layer: int, shard: Shard, factory: FactoryKwargs
    ) -> None:
        super().__init__()
        self.layer = layer
        # This rank's heads (all of them on one device).
        self.num_heads = len(shard.layout.q_heads)
        self.num_kv_heads = len(shard.layout.kv_heads)
        self.head_dim = config.head_dim
        h, q_size = config.hidden_size, self.num_heads * config.head_dim
        kv_size = self.num_kv_heads * config.head_dim
        self.q_proj = Linear(h, q_size, bias=config.attention_bias, **factory)
        self.k_proj = Linear(h, kv_size, bias=config.attention_bias, **factory)
        self.v_proj = Linear(h, kv_size, bias=config.attention_bias, **factory)
        self.o_proj = RowParallelLinear(
            q_size, h, bias=config.attention_out_bias, tp=shard.tp, **factory
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        backend: AttentionBackend,
        meta: Any,
    ) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        q = apply_rotary_signed(q, cos, sin)
        k = apply_rotary_signed(k, cos, sin)
        out = backend.forward(self.layer, q, k, v, meta)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, layer: int, shard: Shard, factory: FactoryKwargs
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer, shard, factory)
        self.mlp = LlamaMLP(config, shard, factory)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **factory)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **factory)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        backend: AttentionBackend,
        meta: Any,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, backend, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, shard: Shard, factory: FactoryKwargs) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, **factory)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, shard, factory) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **factory)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        meta: Any,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # Once per step, shared by all layers: [N, 1, head_dim] (broadcast over heads), the
        # sine signed for apply_rotary_signed.
        cos, sin = self.rotary(positions, x.dtype)
        cos, sin = cos.unsqueeze(1), signed_sin(sin).unsqueeze(1)
        for layer in self.layers:
            x = layer(x, cos, sin, backend, meta)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Decoder plus LM head.

    ``forward(input_ids [N], positions [N], meta) -> hidden [N, hidden_size]`` (after the
    final norm); ``compute_logits(hidden [M, hidden_size]) -> [M, vocab]`` in float32. The
    caller picks which rows need logits (usually each sequence's last token).

    With ``tp`` of several ranks, this is one rank's shard (see :mod:`.parallel`): its
    attention layers take and return its own heads (``shard.layout``), and every rank must
    run each forward pass together.
    """

    def __init__(
        self,
        config: ModelConfig,
        backend: AttentionBackend | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        tp: TensorParallel | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        tp = tp or TensorParallel()
        self.shard = Shard(tp, ShardLayout.of(config, tp.rank, tp.size))
        factory: FactoryKwargs = {"dtype": dtype, "device": device}
        self.model = LlamaModel(config, self.shard, factory)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, **factory)
        self.tie_weights()
        self.set_attention_backend(backend)

    @property
    def rotary(self) -> RotaryEmbedding:
        """The model's rotary embedding (its frequencies), for what the engine computes
        about positions outside a forward pass."""
        return self.model.rotary

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head when the config says so.

        Call again after replacing parameters (``load_state_dict(assign=True)`` unties).
        """
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_attention_backend(self, backend: AttentionBackend | None) -> None:
        # Kept out of nn.Module's registry: a backend that happens to be a Module (holding
        # the KV cache) must not become part of this model's parameters or state dict.
        self.__dict__["_backend"] = backend

    @property
    def attention_backend(self) -> AttentionBackend | None:
        return self.__dict__["_backend"]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: Any) -> torch.Tensor:
        backend = self.attention_backend
        if backend is None:
            raise RuntimeError("no attention backend: call set_attention_backend() first")
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(
                "input_ids and positions must be 1-D tensors of the same length (flat layout), "
                f"got {tuple(input_ids.shape)} and {tuple(positions.shape)}"
            )
        return self.model(input_ids, positions, backend, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # float32 so that samplers see the same distribution whatever the model dtype.
        return self.lm_head(hidden).float()
