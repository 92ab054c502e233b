"""Every Triton kernel variant compiles for real GPUs (Hopper sm_90, Ampere sm_80) through
Triton's compiler and ptxas, without a GPU, and fits the target's shared memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[3]
# Shared memory one program may use (the opt-in maximum per block).
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
# Per target: 3 decode shapes per KV dtype (fp8 from sm_89), each the partial, metric and (for
# several splits) reduce kernels; 12 window-metric variants of two kernels each.
EXPECTED = {90: 4 * (3 + 3 + 2) + 2 * 12, 80: 3 * (3 + 3 + 2) + 2 * 12}


@pytest.mark.parametrize("arch", [90, 80])
def test_every_kernel_compiles_for_the_gpu_and_fits_its_shared_memory(arch, tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile, not a cached result
    proc = subprocess.run(
        [sys.executable, "-m", "tests.attention.triton.gpu_compile", str(arch)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(records) == EXPECTED[arch]
    kernels = {r["kernel"] for r in records}
    assert kernels == {"_partial", "_reduce", "_metric", "_row_lse", "_column_sums"}
    assert max(r["shared"] for r in records) <= SHARED_LIMIT[arch]
