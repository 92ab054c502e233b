"""A slow, obviously correct planner written with plain Python lists, for the tests.

It reads a cache's state one head at a time and applies the spec's rule literally.
"""

from __future__ import annotations

import math

import torch

from kvcompress.compress import CompressionParams


def head_contents(cache, slot, layer, head):
    """[(logical index, position, metric)] of a head's held KVs, in block-table order."""
    n = int(cache.context_lens[layer, slot, head])
    bs = cache.block_size
    out = []
    for i in range(n):
        block = int(cache.block_tables[layer, slot, head, i // bs])
        out.append((i, int(cache.position[block, i % bs]), float(cache.metric[block, i % bs])))
    return out


def protected_count(seq_len, p: CompressionParams):
    recent = min(seq_len, p.protected_window)
    return recent + min(max(seq_len - recent, 0), p.sinks)


def allowed_total(seq_len, p: CompressionParams, num_heads, block_size):
    prot = protected_count(seq_len, p)
    if p.max_cache_tokens is not None:
        target = float(p.max_cache_tokens)
    else:
        target = prot + max(seq_len - prot, 0) / p.compression_rate
        target = max(target, min(p.min_cache_tokens, seq_len))
    return math.ceil(target * num_heads / block_size)


def per_head_allowance(total, p: CompressionParams, num_layers, num_kv_heads):
    heads = num_layers * num_kv_heads

    def even(n, parts):
        return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]

    if p.policy_spec.allocation != "pyramid" or num_layers == 1:
        return even(total, heads)
    weights = torch.linspace(2 - 1 / 20, 1 / 20, num_layers, dtype=torch.float64).tolist()
    wsum = float(torch.tensor(weights, dtype=torch.float64).sum())
    ideal = [total * w / wsum for w in weights]
    layer = [math.floor(x) for x in ideal]
    short = total - sum(layer)
    for i in sorted(range(num_layers), key=lambda i: (layer[i] - ideal[i], i))[:short]:
        layer[i] += 1
    return [a for n in layer for a in even(n, num_kv_heads)]


def queries_counted(pos, seq_len, prefill_len, window=32, buffer=0):
    """Queries that added to the metric of the KV at ``pos``, by enumerating them: the
    prefill's window (the last ``window`` prompt queries), then one per decode step."""
    prefill_queries = range(max(0, prefill_len - window), prefill_len)
    decode_queries = range(prefill_len, seq_len)
    return sum(1 for q in [*prefill_queries, *decode_queries] if q >= pos and q - pos >= buffer)


def score_of(pos, metric, seq_len, p: CompressionParams):
    if p.effective_scorer == "position":
        return float(pos)
    if p.effective_metric.endswith("avg"):
        # The test caches hold only prefilled tokens: the prefill ended at seq_len.
        return metric / max(1, queries_counted(pos, seq_len, seq_len))
    return metric


def reference_plan(cache, slot, p: CompressionParams):
    """{(layer, head): set of evicted logical indices}, blocks freed in all."""
    bs = cache.block_size
    L, H = cache.num_layers, cache.num_kv_heads
    seq_len = int(cache.seq_lens[slot])
    heads = []
    for layer in range(L):
        for head in range(H):
            contents = head_contents(cache, slot, layer, head)
            evictable = [
                (score_of(pos, m, seq_len, p), i)
                for i, pos, m in contents
                if pos < seq_len - p.protected_window and pos >= p.sinks
            ]
            evictable.sort()  # by score, then logical index
            n = len(contents)
            nb = -(-n // bs)
            hang = n - (nb - 1) * bs if n else 0
            chunks = []
            j = 0
            while n and j * bs + hang <= len(evictable):
                chunks.append(evictable[j * bs + hang - 1][0])
                j += 1
            heads.append(((layer, head), evictable, nb, hang, chunks))

    total = allowed_total(seq_len, p, L * H, bs)
    if p.policy_spec.allocation == "global":
        to_free = max(0, sum(h[2] for h in heads) - total)
        # The layer floor: each layer keeps its unevictable blocks plus an even share of
        # what the budget leaves for evictable ones; its heads' lowest chunks beyond that
        # are the only candidates of the global selection.
        fixed = [h[2] - len(h[4]) for h in heads]
        share = math.floor(max(0, total - sum(fixed)) * p.layer_floor / L)
        open_chunks = [0] * len(heads)
        for layer in range(L):
            rows = range(layer * H, (layer + 1) * H)
            keep = sum(fixed[i] for i in rows) + share
            must_free = max(0, sum(heads[i][2] for i in rows) - keep)
            in_layer = sorted((heads[i][4][j], j, i) for i in rows for j in range(len(heads[i][4])))
            for _, _, i in in_layer[:must_free]:
                open_chunks[i] += 1
        candidates = sorted(
            (score, j, idx)
            for idx, h in enumerate(heads)
            for j, score in enumerate(h[4])
            if j < open_chunks[idx]
        )
        freed = [0] * len(heads)
        for _, _, idx in candidates[:to_free]:
            freed[idx] += 1
    else:
        allowance = per_head_allowance(total, p, L, H)
        freed = [min(max(0, h[2] - a), len(h[4])) for h, a in zip(heads, allowance, strict=True)]

    plan = {}
    for (key, evictable, _, hang, _), k in zip(heads, freed, strict=True):
        count = (k - 1) * bs + hang if k else 0
        plan[key] = {i for _, i in evictable[:count]}
    return plan, sum(freed)
