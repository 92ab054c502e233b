"""``bench kernels``: the peak-bandwidth table and a tiny CPU run."""

from __future__ import annotations

from kvcompress.bench.kernels import KernelBenchConfig, peak_bandwidth, run_kernel_bench


def test_peak_bandwidth_of_known_devices() -> None:
    assert peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert peak_bandwidth("NVIDIA H200") == 4.8e12
    assert peak_bandwidth("NVIDIA A100-SXM4-40GB") == 1.555e12
    assert peak_bandwidth("Some New Accelerator") is None


def test_cpu_run_times_the_torch_backend_and_sdpa() -> None:
    cfg = KernelBenchConfig(
        contexts=(33,), batch_sizes=(2,), block_sizes=(8,), num_kv_heads=2, group=2,
        head_dim=16, device="cpu", repeats=1,
    )  # fmt: skip
    (row,) = run_kernel_bench(cfg)
    assert row["kv_mib"] == 2 * 2 * 2 * 33 * 16 * 4 / 2**20
    assert row["torch_us"] > 0 and row["sdpa_contiguous_us"] > 0 and "triton_us" not in row
