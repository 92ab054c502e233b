"""Compression split over ranks evicts exactly what one cache holding every head evicts.

Two gloo processes each hold some (layer, KV head) rows of the same sequences, with the same
metrics as a one-device cache; their compressors exchange chunk scores. Integer metrics from a
small range make ties common, so the tie-breaking by global row is exercised too. A head
replicated on both ranks holds a part of its metric on each, the parts ranking its KVs
differently (integers: they add up exactly), as each replica sees part of the GQA group's
queries.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvcompress.cache import CacheConfig, PagedKVCache
from kvcompress.compress import AllGatherExchange, CompressionParams, Compressor

LAYERS, BLOCK = 3, 4
LENGTHS = [37, 90, 61]
PARAMS = [
    CompressionParams(
        policy="kvcompress", compression_rate=4, min_cache_tokens=0, protected_window=4
    ),
    CompressionParams(
        policy="kvcompress", max_cache_tokens=9, protected_window=2, sinks=1, layer_floor=0.75
    ),
    CompressionParams(policy="kvcompress", compression_rate=2.5, min_cache_tokens=0),
]


def metric(layer, head, pos, seq, part: int | None = None) -> torch.Tensor:
    """Small integers (many ties): the sum of two parts that rank the KVs differently."""
    parts = ((layer * 7 + head * 5 + pos * 3 + seq) % 4, (pos * pos + seq * 11) % 5)
    return parts[0] + parts[1] if part is None else parts[part]


def build(heads: list[int], part: int | None = None) -> tuple[PagedKVCache, list[int]]:
    """A cache of the given global KV heads, holding the metric or one of its parts."""
    cfg = CacheConfig(
        num_layers=LAYERS,
        num_kv_heads=len(heads),
        head_dim=2,
        block_size=BLOCK,
        kv_cache_memory=3000 * BLOCK * (2 * 2 * 4 + 8),
        max_seqs=8,
        max_model_len=256,
    )
    cache = PagedKVCache(cfg)
    slots = [cache.allocate_seq() for _ in LENGTHS]
    plan = cache.prepare_append(torch.tensor(slots), torch.tensor(LENGTHS))
    layer = torch.arange(LAYERS).view(-1, 1, 1).expand_as(plan.slots)
    head = torch.tensor(heads).view(1, -1, 1).expand_as(plan.slots)
    pos = plan.positions.view(1, 1, -1).expand_as(plan.slots)
    seq = plan.token_seq_index.view(1, 1, -1).expand_as(plan.slots)
    values = metric(layer, head, pos, seq, part).float()
    cache.metric.view(-1)[plan.slots.reshape(-1)] = values.reshape(-1)
    return cache, slots


def kept(cache: PagedKVCache, slots: list[int]) -> list:
    """Per sequence, per (layer, head): the positions held, sorted."""
    view = cache.head_view(torch.tensor(slots))
    positions = view.gather(cache.position)
    return [
        [
            sorted(positions[s, r, : int(view.lens[s, r])].tolist())
            for r in range(view.lens.shape[1])
        ]
        for s in range(len(slots))
    ]


def _rank(rank: int, init: str, layout: list[list[int]], num_kv_heads: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=len(layout))
    try:
        replicated = len({h for heads in layout for h in heads}) < sum(map(len, layout))
        cache, slots = build(layout[rank], part=rank if replicated else None)
        rows = [
            (torch.arange(LAYERS).view(-1, 1) * num_kv_heads + torch.tensor(heads)).reshape(-1)
            for heads in layout
        ]
        exchange = AllGatherExchange(None, rank, rows)
        Compressor(cache, exchange=exchange).compress(slots, PARAMS)
        assert cache.audit().ok
        Path(out).write_text(json.dumps(kept(cache, slots)))
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path: Path, layout: list[list[int]], num_kv_heads: int) -> list[list]:
    ctx = mp.get_context("spawn")
    init = f"file://{tmp_path}/rendezvous"
    outs = [str(tmp_path / f"rank{r}.json") for r in range(len(layout))]
    procs = [
        ctx.Process(target=_rank, args=(r, init, layout, num_kv_heads, outs[r]))
        for r in range(len(layout))
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    return [json.loads(Path(o).read_text()) for o in outs]


def test_two_ranks_evict_what_one_cache_evicts(tmp_path: Path) -> None:
    cache, slots = build([0, 1, 2, 3])
    Compressor(cache).compress(slots, PARAMS)
    want = kept(cache, slots)  # [S][layer * 4 + head]
    ranks = run_ranks(tmp_path, [[0, 1], [2, 3]], 4)
    for s in range(len(LENGTHS)):
        for layer in range(LAYERS):
            got = ranks[0][s][2 * layer : 2 * layer + 2] + ranks[1][s][2 * layer : 2 * layer + 2]
            assert got == want[s][4 * layer : 4 * layer + 4]
    # The selection was global: heads kept different numbers of KVs.
    assert len({len(row) for row in want[1]}) > 1


def test_a_replicated_head_sums_its_replicas_scores_and_counts_once(tmp_path: Path) -> None:
    cache, slots = build([0])
    Compressor(cache).compress(slots, PARAMS)
    want = kept(cache, slots)
    ranks = run_ranks(tmp_path, [[0], [0]], 1)
    assert ranks[0] == ranks[1] == want
