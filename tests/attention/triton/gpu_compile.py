"""Compile every Triton kernel variant the backend launches for a real GPU target, with no GPU:
Triton's own compiler and its bundled ``ptxas`` produce the machine code, and nothing is
launched. Under ``TRITON_INTERPRET`` (how the other kernel tests run here) kernels are never
compiled at all, so code that only the interpreter accepts would otherwise first fail on a GPU.

Run as ``python -m tests.attention.triton.gpu_compile ARCH`` (e.g. 90 for Hopper) in a process
without ``TRITON_INTERPRET``; prints one JSON object per compiled kernel.
"""

from __future__ import annotations

import json
import sys

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from kvcompress.attention.triton import decode, window
from kvcompress.cache import FP8


class TargetOnlyDriver:
    """The few driver calls compilation makes, answered for ``arch`` without a device."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def compile_all(arch: int) -> list[dict]:
    """Every decode and window-metric variant for ``arch`` (fp8 only where the target has
    fp8 conversions, sm_89+); one record per kernel compiled."""
    compiled: list[dict] = []
    launch = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        kernel = kernel.result() if hasattr(kernel, "result") else kernel
        md = kernel.metadata
        compiled.append({"kernel": self.fn.__name__, "shared": md.shared, "warps": md.num_warps})
        return kernel

    driver.set_active(TargetOnlyDriver(arch))
    JITFunction.run = compile_only
    decode._num_sms = lambda device: 132  # what choose_splits asks of the device
    try:
        kv_dtypes = [torch.bfloat16, torch.float16, torch.float32] + ([FP8] if arch >= 89 else [])
        for kv_dtype in kv_dtypes:
            q_dtype = torch.bfloat16 if kv_dtype == FP8 else kv_dtype
            for bs, dim, group, splits in ((16, 128, 4, 1), (1, 64, 3, 3), (128, 64, 8, 2)):
                _decode_variant(kv_dtype, q_dtype, bs, dim, group, splits)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for dim, q_heads, kv_heads in ((64, 9, 3), (128, 32, 8)):
                for power in (1, 2):
                    q = torch.randn(q_heads, 8, dim).to(dtype)
                    k = torch.randn(40, kv_heads, dim).to(dtype)
                    window.window_probability_sums(q, k, dim**-0.5, power, buffer=2)
    finally:
        JITFunction.run = launch
    return compiled


def _decode_variant(kv_dtype, q_dtype, bs: int, dim: int, group: int, splits: int) -> None:
    B, H, num_blocks = 2, 2, 8
    q = torch.randn(B, H * group, dim).to(q_dtype)
    k = torch.randn(num_blocks, bs, dim).to(kv_dtype)
    tables = torch.zeros(3, H, 4, dtype=torch.long)
    lens = torch.zeros(3, H, dtype=torch.long)
    scales = (torch.ones(H), torch.ones(H)) if kv_dtype == FP8 else (None, None)
    sink = decode.MetricSink(
        torch.zeros(num_blocks, bs),
        torch.zeros(num_blocks, bs, dtype=torch.int32),
        torch.tensor([2, 1]),
        torch.tensor([5, 5]),
        torch.tensor([0, 3]),
    )
    decode.paged_decode(
        q, k, k.clone(), tables, lens, torch.tensor([0, 2]),
        max_len=1024, k_scale=scales[0], v_scale=scales[1], metric=sink, num_splits=splits,
    )  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m tests.attention.triton.gpu_compile ARCH")
    for record in compile_all(int(sys.argv[1])):
        print(json.dumps(record))
