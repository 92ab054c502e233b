"""Time the paged decode kernel's tile and warp settings on one GPU (a tuning aid, not a
benchmark of record: ``kvcompress bench kernels`` is). Prints one line per variant: median
microseconds (triton.testing.do_bench, L2 cleared between calls) and the share of the K/V
bytes' time at the card's peak bandwidth.

    python tools/tune_decode.py [--context 8192] [--batch-sizes 8,64] [--block-size 16]
"""

from __future__ import annotations

import argparse
import functools

import torch
from triton.testing import do_bench

from kvcompress.attention.triton.decode import MetricSink, paged_decode
from kvcompress.bench.kernels import peak_bandwidth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--batch-sizes", default="8,64")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    dev = torch.device("cuda")
    peak = peak_bandwidth(torch.cuda.get_device_name(dev))
    H, G, D, bs, n = args.kv_heads, args.group, args.head_dim, args.block_size, args.context
    for B in (int(b) for b in args.batch_sizes.split(",")):
        blocks_per_head = -(-n // bs)
        num_blocks = B * H * blocks_per_head
        k = torch.randn(num_blocks, bs, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        # Each head's blocks scattered over the pool, as after many allocations.
        perm = torch.randperm(num_blocks, device=dev)
        tables = perm.view(B, H, blocks_per_head)
        lens = torch.full((B, H), n, device=dev)
        slots = torch.arange(B, device=dev)
        q = torch.randn(B, H * G, D, device=dev, dtype=torch.bfloat16)
        kv_bytes = 2 * B * H * n * D * 2
        sink = MetricSink(
            torch.zeros(num_blocks, bs, device=dev),
            torch.zeros(num_blocks, bs, device=dev, dtype=torch.int32),
            torch.full((B,), 2, device=dev),
            torch.full((B,), n, device=dev),
        )
        for metric in (None, sink):
            for block_n in (32, 64, 128):
                for warps in (2, 4, 8):
                    call = functools.partial(
                        paged_decode, q, k, v, tables, lens, slots,
                        max_len=n, metric=metric, block_n=block_n, num_warps=warps,
                    )  # fmt: skip
                    try:
                        us = 1e3 * do_bench(call, warmup=10, rep=40, return_mode="median")
                    except Exception as err:  # a variant that does not compile or fit
                        print(f"B={B} block_n={block_n} warps={warps}: {type(err).__name__}")
                        continue
                    share = kv_bytes / (us * 1e-6) / peak if peak else float("nan")
                    print(
                        f"B={B:3d} ctx={n} bs={bs} metric={metric is not None!s:5} "
                        f"block_n={block_n:3d} warps={warps}: {us:9.1f} us "
                        f"{kv_bytes / (us * 1e-6) / 1e9:7.0f} GB/s  peak share {share:.2f}"
                    )


if __name__ == "__main__":
    main()
