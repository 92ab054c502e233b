"""Paged decode attention for the per-head cache: K and V read straight from the pools.

Each program handles one (sequence, KV head) and one range of its keys ("split"): it loads the
head's own block-table row and length, so heads of one sequence may hold different numbers of
KVs, and no gather copy of K or V is made. All ``G`` query heads of the GQA group are the rows
of one query tile, so every K/V load serves the whole group.

Three kernels:

1. ``_partial``: online softmax over the split's keys. With one split it writes the output
   and the log-sum-exp directly; otherwise the split's (max, sum, accumulator).
2. ``_reduce``: combines the splits' parts into the output and the log-sum-exp.
3. ``_metric`` (only when some sequence collects the eviction metric): a second, lighter pass
   over K alone that recomputes the logits, turns them into probabilities with the final
   log-sum-exp, and adds ``p`` (power 1) or ``p**2`` (power 2), summed over the group, to each
   attended KV's metric slot. Probabilities never reach global memory. Each slot belongs to
   exactly one (layer, sequence, head), so the read-modify-write needs no atomics.

fp8 pools: the per-(layer, head) scales are folded into the logits' scale (K) and applied to
the accumulator (V), so the pools' values are only converted, never multiplied, per element.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kvcompress.attention.triton.splits import SplitPlan, choose_splits, split_evenly


class MetricSink(NamedTuple):
    """Where and how one decode step's probabilities are accumulated."""

    metric: torch.Tensor  # [num_blocks, block_size] fp32, updated in place
    position: torch.Tensor  # [num_blocks, block_size] int32: original position of each KV
    power: torch.Tensor  # [B] 0 (collects nothing), 1 or 2
    query_pos: torch.Tensor  # [B] position of each sequence's decode token
    # [B] long: each sequence skips keys fewer than this many positions before its query;
    # None: no sequence has a buffer (positions are not read at all).
    buffer: torch.Tensor | None = None


class DecodeResult(NamedTuple):
    out: torch.Tensor  # [B, Hq, D] in q's dtype (0 for a head holding no KV)
    lse: torch.Tensor  # [B, Hq] fp32 log-sum-exp of the scaled logits (-inf: no KV)
    splits: SplitPlan


@triton.jit
def _partial(
    Q,  # [B, Hq, D]
    K,  # [num_blocks, block_size, D]
    V,
    Tables,  # [S, H, max_blocks] block ids
    Lens,  # [S, H] KVs held
    Slots,  # [B] rows of Tables / Lens
    KScale,  # [H] fp32 (read only when HAS_SCALE)
    VScale,
    Out,  # [B, Hq, D] contiguous (NUM_SPLITS == 1)
    Lse,  # [B, Hq] contiguous (NUM_SPLITS == 1)
    PartM,  # [B, Hq, NUM_SPLITS] contiguous (NUM_SPLITS > 1)
    PartL,
    PartAcc,  # [B, Hq, NUM_SPLITS, D] contiguous
    sm_scale,
    split_len,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_vb,
    stride_vs,
    stride_ts,
    stride_th,
    stride_ls,
    stride_lh,
    H: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // H
    h = pid % H
    seq = tl.load(Slots + b).to(tl.int64)
    n = tl.load(Lens + seq * stride_ls + h * stride_lh)
    start = split * split_len
    end = tl.minimum(start + split_len, n)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    g_mask = offs_g < G
    heads = h * G + offs_g
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None],
        other=0.0,
    )
    if DOT_F32:
        q = q.to(tl.float32)
    qk_scale = sm_scale
    if HAS_SCALE:
        qk_scale = qk_scale * tl.load(KScale + h)
    table = Tables + seq * stride_ts + h * stride_th

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for kv_start in range(start, end, BLOCK_N):
        offs_n = kv_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        # Block id of every key of the tile: one table entry per key, so any block size
        # (smaller or larger than the tile) is read the same way.
        blk = tl.load(table + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        within = (offs_n % BLOCK_SIZE).to(tl.int64)
        k = tl.load(
            K + (blk * stride_kb + within * stride_ks)[:, None] + offs_d[None, :],
            mask=n_mask[:, None],
            other=0.0,
        ).to(q.dtype)  # fp8 -> the queries' dtype: exact
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [BLOCK_G, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps max -inf: subtract 0 instead (no NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        v = tl.load(
            V + (blk * stride_vb + within * stride_vs)[:, None] + offs_d[None, :],
            mask=n_mask[:, None],
            other=0.0,
        ).to(q.dtype)  # fp8 -> the queries' dtype: exact
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision="ieee")
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    if HAS_SCALE:
        acc = acc * tl.load(VScale + h)

    rows = b * (H * G) + heads  # flat (sequence, query head) index
    if NUM_SPLITS == 1:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            Out + rows[:, None] * D + offs_d[None, :],
            o.to(Out.dtype.element_ty),
            mask=g_mask[:, None],
        )
        lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(Lse + rows, lse, mask=g_mask)
    else:
        part = rows * NUM_SPLITS + split
        tl.store(PartM + part, m_i, mask=g_mask)
        tl.store(PartL + part, l_i, mask=g_mask)
        tl.store(PartAcc + part[:, None] * D + offs_d[None, :], acc, mask=g_mask[:, None])


@triton.jit
def _reduce(
    PartM,
    PartL,
    PartAcc,
    Out,  # [B * Hq, D] contiguous
    Lse,  # [B * Hq]
    D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    s_mask = offs_s < NUM_SPLITS
    part = row * NUM_SPLITS + offs_s
    m = tl.load(PartM + part, mask=s_mask, other=float("-inf"))
    l_part = tl.load(PartL + part, mask=s_mask, other=0.0)
    acc = tl.load(PartAcc + part[:, None] * D + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp(m - m_safe)  # empty parts (max -inf) weigh 0
    total = tl.sum(w * l_part, 0)
    o = tl.sum(w[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)
    tl.store(Out + row * D + offs_d, o.to(Out.dtype.element_ty))
    lse = m_safe + tl.log(tl.where(total > 0, total, 1.0))
    tl.store(Lse + row, tl.where(total > 0, lse, float("-inf")))


@triton.jit
def _metric(
    Q,
    K,
    Tables,
    Lens,
    Slots,
    KScale,
    Lse,  # [B, Hq] contiguous
    Metric,  # [num_blocks * BLOCK_SIZE] fp32
    Position,  # [num_blocks * BLOCK_SIZE] int32
    Power,  # [B]
    QueryPos,  # [B]
    Buffer,  # [B] (read only when HAS_BUFFER)
    sm_scale,
    split_len,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_ts,
    stride_th,
    stride_ls,
    stride_lh,
    H: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BUFFER: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // H
    h = pid % H
    power = tl.load(Power + b)
    seq = tl.load(Slots + b).to(tl.int64)
    n = tl.load(Lens + seq * stride_ls + h * stride_lh)
    start = split * split_len
    # A sequence collecting nothing runs no iteration.
    end = tl.where(power > 0, tl.minimum(start + split_len, n), start)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    g_mask = offs_g < G
    heads = h * G + offs_g
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None],
        other=0.0,
    )
    if DOT_F32:
        q = q.to(tl.float32)
    # Padding rows get lse = +inf: their probabilities are exp(-inf) = 0.
    lse = tl.load(Lse + b * (H * G) + heads, mask=g_mask, other=float("inf"))
    qk_scale = sm_scale
    if HAS_SCALE:
        qk_scale = qk_scale * tl.load(KScale + h)
    query_pos = tl.load(QueryPos + b)
    table = Tables + seq * stride_ts + h * stride_th
    for kv_start in range(start, end, BLOCK_N):
        offs_n = kv_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        blk = tl.load(table + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        within = (offs_n % BLOCK_SIZE).to(tl.int64)
        k = tl.load(
            K + (blk * stride_kb + within * stride_ks)[:, None] + offs_d[None, :],
            mask=n_mask[:, None],
            other=0.0,
        ).to(q.dtype)  # fp8 -> the queries' dtype: exact
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        p = tl.exp(s - lse[:, None])
        p = tl.where(power == 2, p * p, p)
        contrib = tl.sum(tl.where(g_mask[:, None], p, 0.0), 0)  # [BLOCK_N]: group sum
        slot = blk * BLOCK_SIZE + within
        keep = n_mask
        if HAS_BUFFER:  # this sequence's own buffer
            pos = tl.load(Position + slot, mask=n_mask, other=0)
            keep = keep & ((query_pos - pos) >= tl.load(Buffer + b))
        old = tl.load(Metric + slot, mask=keep, other=0.0)
        tl.store(Metric + slot, old + contrib, mask=keep)


def dot_in_float32(dtype: torch.dtype) -> bool:
    """Whether the kernels multiply in float32: for float32 queries, and always under the
    interpreter, whose ``tl.dot`` on bfloat16 is wrong (numpy has no bfloat16). On the GPU,
    half-precision queries multiply in their dtype with float32 accumulation."""
    return dtype == torch.float32 or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits, so tests exercise the reduce


def paged_decode(
    q: torch.Tensor,  # [B, Hq, D]
    k_pool: torch.Tensor,  # [num_blocks, block_size, D]
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,  # [S, H, max_blocks]: one layer's tables (a view, no copy)
    context_lens: torch.Tensor,  # [S, H]: that layer's lengths
    seq_slots: torch.Tensor,  # [B] rows of the tables holding the batch's sequences
    *,
    max_len: int,  # an upper bound on the batch's context_lens, known on the host
    scale: float | None = None,  # softmax scale (default head_dim ** -0.5)
    k_scale: torch.Tensor | None = None,  # [H] fp32 dequantisation scales (fp8 pools)
    v_scale: torch.Tensor | None = None,
    metric: MetricSink | None = None,
    num_splits: int | None = None,  # None: from the longest head and the device (choose_splits)
    block_n: int = 64,  # keys per tile (>= 16, a power of two)
    num_warps: int = 4,
) -> DecodeResult:
    """One decode step of attention over the per-head paged cache (and the metric, if asked).

    A head holding no KV gets output 0 and log-sum-exp -inf.
    """
    B, Hq, D = q.shape
    H = block_tables.shape[1]
    bs = k_pool.shape[1]
    G = Hq // H
    if Hq != G * H or D & (D - 1) or D < 16:
        raise ValueError(f"query heads {Hq} over KV heads {H}, head dim {D} (power of two >= 16)")
    if q.stride(-1) != 1 or k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1:
        raise ValueError("q, k_pool and v_pool need a contiguous last dimension")
    if block_tables.stride(-1) != 1:
        raise ValueError("block_tables need a contiguous last dimension")
    scale = D**-0.5 if scale is None else scale
    has_scale = k_scale is not None
    if has_scale and v_scale is None:
        raise ValueError("fp8 pools need both k_scale and v_scale")
    dummy = q.new_empty(1, dtype=torch.float32)
    k_scale = k_scale if k_scale is not None else dummy
    v_scale = v_scale if v_scale is not None else dummy

    if num_splits is None:
        plan = choose_splits(max_len, B * H, _num_sms(q.device), block_n)
    else:  # forced (tests, benchmarks)
        plan = split_evenly(max_len, num_splits, block_n)
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, dtype=torch.float32, device=q.device)
    if B == 0:
        return DecodeResult(out, lse, plan)
    ns = plan.num_splits
    if ns > 1:
        part_m = torch.empty(B, Hq, ns, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(B, Hq, ns, D, dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = dummy
    block_g = max(16, triton.next_power_of_2(G))  # tl.dot needs 16 rows
    common = dict(
        H=H, G=G, D=D, BLOCK_SIZE=bs, BLOCK_G=block_g, BLOCK_N=block_n,
        DOT_F32=dot_in_float32(q.dtype),
    )  # fmt: skip
    _partial[(B * H, ns)](
        q, k_pool, v_pool, block_tables, context_lens, seq_slots, k_scale, v_scale,
        out, lse, part_m, part_l, part_acc,
        scale, plan.split_len,
        q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        block_tables.stride(0), block_tables.stride(1),
        context_lens.stride(0), context_lens.stride(1),
        NUM_SPLITS=ns, HAS_SCALE=has_scale, num_warps=num_warps, **common,
    )  # fmt: skip
    if ns > 1:
        _reduce[(B * Hq,)](
            part_m, part_l, part_acc, out, lse,
            D=D, NUM_SPLITS=ns, BLOCK_S=triton.next_power_of_2(ns), num_warps=num_warps,
        )  # fmt: skip
    if metric is not None:
        if metric.metric.stride(-1) != 1 or not metric.metric.is_contiguous():
            raise ValueError("the metric pool must be contiguous")
        has_buffer = metric.buffer is not None
        _metric[(B * H, ns)](
            q, k_pool, block_tables, context_lens, seq_slots, k_scale, lse,
            metric.metric, metric.position, metric.power, metric.query_pos,
            metric.buffer if has_buffer else metric.power,
            scale, plan.split_len,
            q.stride(0), q.stride(1),
            k_pool.stride(0), k_pool.stride(1),
            block_tables.stride(0), block_tables.stride(1),
            context_lens.stride(0), context_lens.stride(1),
            HAS_SCALE=has_scale, HAS_BUFFER=has_buffer, num_warps=num_warps, **common,
        )  # fmt: skip
    return DecodeResult(out, lse, plan)
