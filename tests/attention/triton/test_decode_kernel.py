"""The paged decode kernels against dense attention over each head's held KVs: outputs,
log-sum-exp and the metric they add, for ragged heads (0 and 1 KV included), block sizes
1 to 128, GQA groups 1 to 8, several splits, and float32 / bfloat16 / fp8 pools."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kvcompress.attention.triton.decode import MetricSink, paged_decode
from kvcompress.cache import FP8

from .conftest import DEVICE

H = 2  # KV heads
LENS = [[0, 5], [1, 37], [23, 9]]  # [B, H]: empty, single, ragged heads


def make_case(bs: int, group: int, dim: int, kv_dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    B = len(LENS)
    lens = torch.tensor(LENS)
    max_blocks = -(-int(lens.max()) // bs)
    num_blocks = B * H * max_blocks + 3
    # Sequences sit at rows 1, 3, 0 of a 4-row table, with scattered blocks.
    seq_slots = torch.tensor([1, 3, 0])
    tables = torch.full((4, H, max_blocks + 2), -1, dtype=torch.long)
    perm = torch.randperm(num_blocks, generator=gen)[: B * H * max_blocks]
    tables[seq_slots, :, :max_blocks] = perm.view(B, H, max_blocks)
    context_lens = torch.zeros(4, H, dtype=torch.long)
    context_lens[seq_slots] = lens
    k, v = (torch.randn(num_blocks, bs, dim, generator=gen) for _ in range(2))
    scales = None
    if kv_dtype == FP8:
        scales = (torch.rand(H, generator=gen) + 0.5, torch.rand(H, generator=gen) + 0.5)
    q = torch.randn(B, H * group, dim, generator=gen)
    return q, k.to(kv_dtype), v.to(kv_dtype), tables, context_lens, seq_slots, scales


def held(pool, tables, context_lens, seq, h, scale):
    n = int(context_lens[seq, h])
    bs = pool.shape[1]
    flat = (tables[seq, h].clamp(min=0).view(-1, 1) * bs + torch.arange(bs)).view(-1)[:n]
    rows = pool.view(-1, pool.shape[-1])[flat].float()
    return (rows if scale is None else rows * scale[h]), flat


# Each sequence's own collection buffer (None: no sequence has one, positions are not read).
MIXED_BUFFERS = (3, 0, 3)


@pytest.mark.parametrize(
    ("bs", "group", "dim", "kv_dtype", "splits", "buffers"),
    [
        (1, 1, 16, torch.float32, 1, MIXED_BUFFERS),
        (8, 3, 16, torch.float32, 3, MIXED_BUFFERS),
        (16, 4, 64, torch.bfloat16, 2, MIXED_BUFFERS),
        (128, 8, 16, torch.float32, 1, None),
        (16, 4, 16, FP8, 2, MIXED_BUFFERS),
    ],
    ids=["bs1-g1", "bs8-g3-split3", "bs16-g4-bf16-split2", "bs128-g8", "bs16-g4-fp8-split2"],
)
def test_paged_decode_matches_dense_attention_and_adds_the_metric(
    bs, group, dim, kv_dtype, splits, buffers
) -> None:
    q, k, v, tables, context_lens, seq_slots, scales = make_case(bs, group, dim, kv_dtype)
    B = q.shape[0]
    num_blocks = k.shape[0]
    gen = torch.Generator().manual_seed(1)
    position = torch.randint(0, 40, (num_blocks, bs), generator=gen, dtype=torch.int32)
    metric = torch.rand(num_blocks, bs, generator=gen)
    power = torch.tensor([2, 1, 2])
    power[2] = 0  # the third sequence collects nothing
    query_pos = torch.tensor([40, 40, 40])
    buffer = torch.tensor(buffers or (0, 0, 0))
    expected_metric = metric.clone().view(-1)
    dev = torch.device(DEVICE)
    moved = [t.to(dev) for t in (q, k, v, tables, context_lens, seq_slots)]
    sink = MetricSink(
        metric.to(dev),
        position.to(dev),
        power.to(dev),
        query_pos.to(dev),
        None if buffers is None else buffer.to(dev),
    )
    result = paged_decode(
        *moved,
        max_len=int(context_lens.max()),
        k_scale=None if scales is None else scales[0].to(dev),
        v_scale=None if scales is None else scales[1].to(dev),
        metric=sink,
        num_splits=splits,
        block_n=16,
    )
    assert result.splits.num_splits == splits
    scale = dim**-0.5
    tol = 2e-2 if kv_dtype == torch.bfloat16 else 1e-5
    for b in range(B):
        seq = int(seq_slots[b])
        for h in range(H):
            keys, flat = held(k, tables, context_lens, seq, h, scales and scales[0])
            values, _ = held(v, tables, context_lens, seq, h, scales and scales[1])
            qg = q[b, h * group : (h + 1) * group]
            got = result.out[b, h * group : (h + 1) * group].cpu()
            if not len(flat):  # a head holding nothing: output 0, lse -inf, no metric
                assert torch.equal(got, torch.zeros_like(got))
                assert torch.isneginf(result.lse[b, h * group : (h + 1) * group]).all()
                continue
            logits = qg @ keys.T * scale
            probs = torch.softmax(logits, -1)
            torch.testing.assert_close(got, probs @ values, atol=tol, rtol=tol)
            lse = torch.logsumexp(logits, -1)
            torch.testing.assert_close(
                result.lse[b, h * group : (h + 1) * group].cpu(), lse, atol=1e-4, rtol=1e-4
            )
            if power[b]:
                far = (query_pos[b] - position.view(-1)[flat]) >= buffer[b]
                expected_metric[flat] += (probs ** int(power[b])).sum(0) * far
    torch.testing.assert_close(sink.metric.view(-1).cpu(), expected_metric, atol=1e-5, rtol=1e-5)


def test_splits_do_not_change_the_result() -> None:
    q, k, v, tables, lens, slots, _ = make_case(4, 2, 16, torch.float32, seed=3)
    dev = torch.device(DEVICE)
    args = [t.to(dev) for t in (q, k, v, tables, lens, slots)]
    one = paged_decode(*args, max_len=37, num_splits=1, block_n=16)
    four = paged_decode(*args, max_len=37, num_splits=4, block_n=16)
    assert four.splits.num_splits == 3  # 37 keys in ranges of 16: the fourth would be empty
    torch.testing.assert_close(one.out, four.out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(one.lse, four.lse, atol=1e-6, rtol=1e-5)
