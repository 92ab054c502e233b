"""Tensor parallelism of the decoder: which shard of each weight a rank holds, and the
row-parallel linear layer whose partial products are summed across ranks.

Q/K/V and gate/up are column-parallel (a rank computes its heads' and its slice of the
intermediate features), O and down are row-parallel (a rank multiplies its slice of the
input features; an all-reduce sums the partial outputs). A rank holds ``num_heads / size``
query heads and the KV heads they read: ``num_kv_heads / size`` of them, or, with more ranks
than KV heads, one KV head replicated on ``size / num_kv_heads`` ranks. The embedding, the
norms and the LM head are replicated, so logits need no collective.

The process group is created by the caller (the engine) and handed in as a
:class:`TensorParallel`; on one rank nothing here changes the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kvcompress.models.config import ModelConfig


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group (the default: alone)."""

    rank: int = 0
    size: int = 1
    group: Any = None  # a torch.distributed ProcessGroup; None when alone

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {self.size!r}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} out of range for {self.size} ranks")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x


@dataclass(frozen=True)
class ShardLayout:
    """The heads and features one rank holds (global indices)."""

    q_heads: range
    kv_heads: range
    intermediate: range

    @classmethod
    def of(cls, config: ModelConfig, rank: int, size: int) -> ShardLayout:
        check_shardable(config, size)
        q = config.num_heads // size
        kv = config.num_kv_heads
        if kv >= size:
            per = kv // size
            kv_heads = range(rank * per, (rank + 1) * per)
        else:  # replicated: rank r serves the KV head of its query heads
            first = rank * q // (config.num_heads // kv)
            kv_heads = range(first, first + 1)
        inter = config.intermediate_size // size
        return cls(
            range(rank * q, (rank + 1) * q), kv_heads, range(rank * inter, (rank + 1) * inter)
        )

    def global_rows(self, num_layers: int, num_kv_heads: int) -> torch.Tensor:
        """``[layers * local KV heads]``: each local (layer, KV head) row's index among the
        model's ``layers * num_kv_heads`` rows (layer-major, as one device orders them)."""
        layers = torch.arange(num_layers).unsqueeze(1) * num_kv_heads
        heads = torch.tensor(list(self.kv_heads)).unsqueeze(0)
        return (layers + heads).reshape(-1)


def check_shardable(config: ModelConfig, size: int) -> None:
    """Refuse a tensor-parallel size the model's shapes cannot split evenly."""
    if size == 1:
        return
    h, kv, inter = config.num_heads, config.num_kv_heads, config.intermediate_size
    problems = []
    if h % size:
        problems.append(f"it must divide the {h} query heads")
    if kv >= size and kv % size:
        problems.append(f"it must divide the {kv} KV heads")
    if kv < size and size % kv:
        problems.append(f"with more ranks than KV heads ({kv}), it must be a multiple of them")
    if inter % size:
        problems.append(f"it must divide the MLP's {inter} intermediate features")
    if problems:
        sizes = [n for n in range(1, h + 1) if _fits(config, n)]
        raise ValueError(
            f"tensor_parallel_size={size} cannot shard this model: {'; '.join(problems)}. "
            f"Sizes that fit: {', '.join(map(str, sizes))}"
        )


def _fits(config: ModelConfig, n: int) -> bool:
    kv = config.num_kv_heads
    return (
        config.num_heads % n == 0
        and config.intermediate_size % n == 0
        and (kv % n == 0 if kv >= n else n % kv == 0)
    )


def shard_index(name: str, config: ModelConfig, layout: ShardLayout) -> tuple[slice, ...] | None:
    """The slice of checkpoint tensor ``name`` this rank loads; None: the whole tensor."""
    d = config.head_dim
    q = slice(layout.q_heads.start * d, layout.q_heads.stop * d)
    kv = slice(layout.kv_heads.start * d, layout.kv_heads.stop * d)
    inter = slice(layout.intermediate.start, layout.intermediate.stop)
    column = {"q_proj": q, "k_proj": kv, "v_proj": kv, "gate_proj": inter, "up_proj": inter}
    row = {"o_proj": q, "down_proj": inter}
    parts = name.split(".")
    if len(parts) < 2:
        return None
    module, kind = parts[-2], parts[-1]
    if module in column:
        return (column[module],)  # weight rows, or the bias
    if module in row and kind == "weight":
        return (slice(None), row[module])  # weight columns; the bias is added once
    return None


# A float32 product on CPU runs faster on oneDNN's blocked copy of the weight than in MKL's
# sgemm over the dense one, at every row count that matters. On one Intel core, weights not
# in cache, [M, 576] x [576, 1536], dense / blocked: M=2 0.29 / 0.31 ms, M=4 0.43 / 0.33,
# M=12 0.77 / 0.42, M=32 0.89 / 0.66, M=512 5.7 / 5.9; the LM head ([576, 49152]) at M=12:
# 38.7 / 11.6 ms. On two AMD EPYC cores (2026-12-04), the LM head at M=1, 2, 3: 12.1 / 5.3,
# 25.8 / 4.9, 38.2 / 5.3 ms, and [M, 576] x [576, 1536] at M=1-3: 0.21-0.44 / 0.09-0.11 ms:
# there, a decode step of 2 sequences took 112 ms with dense weights below 4 rows and one of
# 4 took 63 ms. So the blocked copy serves every product.


def packing_available() -> bool:
    """Whether this torch build can pack linear weights (:func:`pack_linear_weights`)."""
    return torch.backends.mkldnn.is_available()


def pack_linear_weights(model: torch.nn.Module) -> None:
    """Give every :class:`Linear` of ``model`` (float32, on CPU, weights loaded) its
    blocked copy: faster batched steps, for twice the weights' memory."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.pack_weight()


class Linear(torch.nn.Linear):
    # oneDNN's blocked copy of the weight, or None. Not a parameter nor a buffer, so it stays
    # out of the state dict (read by transformers and the tensor-parallel loader).
    packed_weight: torch.Tensor | None = None

    def reset_parameters(self) -> None:
        # Meta-device parameters exist only to be replaced by loaded weights. Initialising
        # them is wasted work and, on meta, routes through torch's reference ops, which
        # import torch._dynamo: most of a warm model load.
        if not self.weight.is_meta:
            super().reset_parameters()

    def pack_weight(self) -> None:
        """Keep a oneDNN-blocked copy of the (float32, CPU) weight beside the dense one (the
        state dict's), which then serves every product. Call it once the weight is final
        (it copies the weight's current values)."""
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 16)

    def product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x W^T + bias`` for ``x`` of ``[rows, in_features]``."""
        if self.packed_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, bias, "none", [], "")
        return F.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x, self.bias)


class RowParallelLinear(Linear):
    """``y = all_reduce(x_r W_r^T) + b``: this rank's input features, summed over ranks."""

    def __init__(self, *args: Any, tp: TensorParallel, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(x)
        out = self.tp.all_reduce(self.product(x, None))
        # After the sum: each rank adding the bias would add it ``size`` times.
        return out if self.bias is None else out.add_(self.bias)
