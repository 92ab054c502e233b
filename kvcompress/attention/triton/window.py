"""The prefill observation-window metric without a float32 ``[Hq, w, T]`` tensor.

:func:`kvcompress.compress.window_metric` materialises every window query's probabilities
over every key of the prompt: ``Hq * w * T`` floats (1 GiB for 32 heads, w = 32 and a
256k-token prompt). Here two kernels stream the keys instead:

1. ``_row_lse``: each window query's log-sum-exp over its causal keys (online softmax).
2. ``_column_sums``: per key tile, every window query's probability ``exp(s - lse)``, squared
   for the L2 metric, masked causally and by the collection buffer, summed over the queries:
   ``[Hq, T]`` floats.

The max-pool along key positions and the GQA group sum then run in torch
(:func:`kvcompress.compress.pool_and_group`, the very code of the reference). Logits are
computed in float32 like the reference's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvcompress.compress import MetricConfig, pool_and_group


@triton.jit
def _row_lse(
    Qw,  # [Hq, w, D]
    K,  # [T, Hkv, D]
    Lse,  # [Hq, w] fp32 contiguous
    scale,
    T,
    W,
    stride_qh,
    stride_qw,
    stride_kt,
    stride_kh,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    hq = tl.program_id(0)
    mblock = tl.program_id(1)
    kvh = hq // G
    offs_m = mblock * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    m_mask = offs_m < W
    q = tl.load(
        Qw + hq * stride_qh + offs_m[:, None] * stride_qw + offs_d[None, :],
        mask=m_mask[:, None],
        other=0.0,
    ).to(tl.float32)
    q_pos = T - W + offs_m
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    # Causal: no query of this tile sees past its last query's position.
    hi = tl.minimum(T, T - W + (mblock + 1) * BLOCK_M)
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < T
        k = tl.load(
            K + offs_n[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :],
            mask=n_mask[:, None],
            other=0.0,
        ).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        visible = n_mask[None, :] & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m_i = m_new
    # Every window query sees at least key 0, so l_i > 0 on real rows.
    lse = m_i + tl.log(tl.where(l_i > 0, l_i, 1.0))
    tl.store(Lse + hq * W + offs_m, lse, mask=m_mask)


@triton.jit
def _column_sums(
    Qw,
    K,
    Lse,
    Out,  # [Hq, T] fp32 contiguous
    scale,
    T,
    W,
    buffer,
    stride_qh,
    stride_qw,
    stride_kt,
    stride_kh,
    G: tl.constexpr,
    D: tl.constexpr,
    POWER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    hq = tl.program_id(0)
    nblock = tl.program_id(1)
    kvh = hq // G
    offs_n = nblock * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    n_mask = offs_n < T
    k = tl.load(
        K + offs_n[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :],
        mask=n_mask[:, None],
        other=0.0,
    ).to(tl.float32)
    total = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, W, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        m_mask = offs_m < W
        q = tl.load(
            Qw + hq * stride_qh + offs_m[:, None] * stride_qw + offs_d[None, :],
            mask=m_mask[:, None],
            other=0.0,
        ).to(tl.float32)
        lse = tl.load(Lse + hq * W + offs_m, mask=m_mask, other=float("inf"))
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        p = tl.exp(s - lse[:, None])
        if POWER == 2:
            p = p * p
        q_pos = T - W + offs_m
        gap = q_pos[:, None] - offs_n[None, :]
        # Causal (gap >= 0) and outside the collection buffer (gap >= buffer).
        keep = m_mask[:, None] & n_mask[None, :] & (gap >= tl.maximum(buffer, 0))
        total += tl.sum(tl.where(keep, p, 0.0), 0)
    tl.store(Out + hq * T + offs_n, total, mask=n_mask)


def window_probability_sums(
    q_window: torch.Tensor,  # [Hq, w, D]
    k: torch.Tensor,  # [T, Hkv, D]
    scale: float,
    power: int,
    buffer: int = 0,
    block_m: int = 16,
    block_n: int = 64,
) -> torch.Tensor:
    """``[Hq, T]``: each key's probability (``**power``) summed over the window's queries."""
    Hq, w, D = q_window.shape
    T, Hkv, _ = k.shape
    if q_window.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q_window and k need a contiguous last dimension")
    if D & (D - 1) or D < 16:
        raise ValueError(f"head dim must be a power of two >= 16, got {D}")
    if power not in (1, 2):
        raise ValueError(f"power must be 1 or 2, got {power}")
    lse = torch.empty(Hq, w, dtype=torch.float32, device=k.device)
    out = torch.empty(Hq, T, dtype=torch.float32, device=k.device)
    if T == 0 or w == 0:
        return out.zero_()
    strides = (q_window.stride(0), q_window.stride(1), k.stride(0), k.stride(1))
    G = Hq // Hkv
    _row_lse[(Hq, triton.cdiv(w, block_m))](
        q_window, k, lse, scale, T, w, *strides, G=G, D=D, BLOCK_M=block_m, BLOCK_N=block_n
    )
    _column_sums[(Hq, triton.cdiv(T, block_n))](
        q_window, k, lse, out, scale, T, w, buffer, *strides,
        G=G, D=D, POWER=power, BLOCK_M=block_m, BLOCK_N=block_n,
    )  # fmt: skip
    return out


def window_metric(
    q_window: torch.Tensor,  # [Hq, w, D], the last w queries of one prompt
    k: torch.Tensor,  # [T, Hkv, D], all keys of that prompt
    scale: float,
    power: int,
    config: MetricConfig,
    spans: torch.Tensor | None = None,
    block_m: int = 16,
    block_n: int = 64,
) -> torch.Tensor:
    """:func:`kvcompress.compress.window_metric` (same arguments, same ``[Hkv, T]`` result)."""
    sums = window_probability_sums(
        q_window, k, scale, power, config.collection_buffer, block_m, block_n
    )
    return pool_and_group(sums, k.shape[1], config.pool_kernel, spans)
