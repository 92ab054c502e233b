"""Shards of the decoder: which heads and features each rank holds, and sharded loading."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from kvcompress.models import ModelConfig, load_model
from kvcompress.models.parallel import ShardLayout, TensorParallel, check_shardable

from .test_loader import hf_dir  # noqa: F401 (the fixture)

SMOLLM2 = ModelConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
)


def test_three_ranks_hold_three_query_heads_and_one_kv_head_each() -> None:
    layouts = [ShardLayout.of(SMOLLM2, r, 3) for r in range(3)]
    assert [list(x.q_heads) for x in layouts] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert [list(x.kv_heads) for x in layouts] == [[0], [1], [2]]
    assert [x.intermediate for x in layouts] == [range(0, 512), range(512, 1024), range(1024, 1536)]
    # Rank 1's rows among one device's layer-major (layer, KV head) rows.
    assert layouts[1].global_rows(30, 3).tolist() == list(range(1, 90, 3))


def test_more_ranks_than_kv_heads_replicate_the_head_of_their_query_heads() -> None:
    config = dataclasses.replace(SMOLLM2, num_heads=8, num_kv_heads=2, intermediate_size=64)
    layouts = [ShardLayout.of(config, r, 4) for r in range(4)]
    assert [list(x.kv_heads) for x in layouts] == [[0], [0], [1], [1]]
    assert [list(x.q_heads) for x in layouts] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_a_size_that_cannot_shard_says_why_and_which_fit() -> None:
    with pytest.raises(ValueError) as info:
        check_shardable(SMOLLM2, 2)
    message = str(info.value)
    assert "must divide the 9 query heads" in message and "Sizes that fit: 1, 3" in message
    check_shardable(SMOLLM2, 3)


def test_shards_load_their_slices_and_together_hold_the_model(hf_dir) -> None:  # noqa: F811
    path: Path = hf_dir[0]
    full = load_model(str(path)).model.state_dict()
    shards = [load_model(str(path), tp=TensorParallel(r, 2)).model for r in range(2)]
    states = [m.state_dict() for m in shards]
    for name, tensor in full.items():
        parts = [s[name] for s in states]
        if name.endswith(
            (
                "q_proj.weight",
                "k_proj.weight",
                "v_proj.weight",
                "gate_proj.weight",
                "up_proj.weight",
            )
        ):
            assert torch.equal(torch.cat(parts, dim=0), tensor), name
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            assert torch.equal(torch.cat(parts, dim=1), tensor), name
        else:  # embedding, norms, LM head: replicated
            assert all(torch.equal(p, tensor) for p in parts), name
    attn = shards[1].model.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
