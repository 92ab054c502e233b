"""``kvcompress bench kernels``: paged decode attention, time and achieved memory bandwidth.

One layer of a decode step, every KV head holding ``context`` KVs, at several batch sizes and
block sizes, three ways on the same K and V: the Triton backend (straight from the pools), the
torch backend (gather, then SDPA), and SDPA over an equivalent contiguous cache (the floor a
paged cache competes with). Bandwidth counts the K and V bytes attention must read
(``2 * batch * kv_heads * context * head_dim * element``), so it is comparable across the
three and against the device's peak. On CPU only the torch backend and SDPA run, on small
shapes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvcompress.attention import build_metadata, make_backend, resolve_backend, triton_available
from kvcompress.bench.engine_run import auto_device
from kvcompress.cache import CacheConfig, PagedKVCache, kv_dtype_from_name, parse_size

# Peak memory bandwidth (bytes/s) by device name: the first entry whose words all appear in
# torch's device name wins (so "H100 PCIe" is tried before plain "H100").
PEAK_BANDWIDTH: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200",), 4.8e12),
    (("H100", "PCIe"), 2.0e12),
    (("H100",), 3.35e12),  # SXM ("NVIDIA H100 80GB HBM3")
    (("A100", "80GB"), 2.0e12),
    (("A100", "40GB"), 1.555e12),
    (("L4",), 0.3e12),
    (("RTX 4090",), 1.008e12),
)


def peak_bandwidth(device_name: str) -> float | None:
    """Bytes/s of a known GPU, None for an unknown one."""
    for words, peak in PEAK_BANDWIDTH:
        if all(w.lower() in device_name.lower() for w in words):
            return peak
    return None


@dataclass(frozen=True)
class KernelBenchConfig:
    contexts: tuple[int, ...] | None = None  # KVs per head; None: 1k-32k (CUDA), 256-1k (CPU)
    batch_sizes: tuple[int, ...] | None = None  # None: 1, 8, 64 (CUDA), 1, 4 (CPU)
    block_sizes: tuple[int, ...] = (8, 16, 32)
    num_kv_heads: int = 8
    group: int = 4  # query heads per KV head (Llama-3-8B: 32 over 8)
    head_dim: int = 128
    kv_cache_dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU; or fp8
    device: str | None = None  # None: cuda if available
    repeats: int = 20
    max_kv_memory: str = "24GiB"  # shapes needing more K/V memory than this are skipped
    collect_metric: bool = True  # also time the Triton path adding the L2 metric

    def __post_init__(self) -> None:
        for name in ("num_kv_heads", "group", "head_dim", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def on_cuda(self) -> bool:
        return torch.device(self.resolved_device).type == "cuda"

    @property
    def resolved_device(self) -> str:
        return auto_device(self.device)

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(contexts, batch sizes), with the device's defaults."""
        cuda = self.on_cuda
        contexts = self.contexts or ((1024, 4096, 16384, 32768) if cuda else (256, 1024))
        batches = self.batch_sizes or ((1, 8, 64) if cuda else (1, 4))
        return contexts, batches


def device_description(cfg: KernelBenchConfig) -> tuple[str, float | None]:
    """(device name, peak bytes/s or None)."""
    if not cfg.on_cuda:
        return "cpu", None
    name = torch.cuda.get_device_name(torch.device(cfg.resolved_device))
    return name, peak_bandwidth(name)


def _timer(device: torch.device, repeats: int) -> Callable[[Callable[[], object]], float]:
    """Median seconds of a call, after warm-up calls (compilation, first touch).

    On CUDA with Triton: ``triton.testing.do_bench``, which times with CUDA events and clears
    the L2 cache before every call (a small shape's K and V would otherwise be read from the
    cache, not from memory).
    """
    if device.type == "cuda" and triton_available():
        from triton.testing import do_bench

        # do_bench's warm-up and repeat budgets are milliseconds.
        return lambda fn: (
            do_bench(fn, warmup=10, rep=max(20, 2 * repeats), return_mode="median") * 1e-3
        )

    def measure(fn: Callable[[], object]) -> float:
        for _ in range(2):
            fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return measure


def _filled_cache(cfg: KernelBenchConfig, batch: int, context: int, block_size: int, dtype):
    """A one-layer paged cache whose every head holds ``context - 1`` random KVs (the step
    appends the last), and the sequences' slots."""
    dev = torch.device(cfg.resolved_device)
    blocks = batch * cfg.num_kv_heads * -(-context // block_size)
    element = torch.empty((), dtype=dtype).element_size()
    per_block = block_size * (2 * cfg.head_dim * element + 8)
    paged = PagedKVCache(
        CacheConfig(
            num_layers=1,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            kv_cache_memory=(blocks + 1) * per_block,
            block_size=block_size,
            dtype=dtype,
            device=dev,
            max_seqs=batch,
            max_model_len=context + 1,  # the metric run appends one more token
        ),
        debug_checks=False,
    )
    slots = torch.tensor([paged.allocate_seq() for _ in range(batch)], device=dev)
    paged.prepare_append(slots, torch.full((batch,), context - 1, device=dev))
    # Random pools, a slice at a time (no full-size float temporary).
    gen = torch.Generator(device=dev).manual_seed(0)
    for pool in (paged.k_pool, paged.v_pool):
        for start in range(0, pool.shape[0], 4096):
            part = pool[start : start + 4096]
            part.copy_(torch.randn(part.shape, generator=gen, device=dev))
    return paged, slots


def _decode_step(paged: PagedKVCache, slots: torch.Tensor, powers: list[int]):
    batch = slots.numel()
    plan = paged.prepare_append(slots, torch.ones(batch, dtype=torch.long, device=slots.device))
    return build_metadata(
        paged,
        seq_slots=slots,
        append=plan,
        query_lens=[1] * batch,
        num_decode=batch,
        computed=[1] * batch,
        metric_powers=powers,
    )


def _time_step(measure, name: str, paged: PagedKVCache, q, new_kv, meta) -> float:
    """Seconds of one layer's decode step (K/V write and attention) on backend ``name``."""
    attend = make_backend(name, paged)
    return measure(lambda: attend.forward(0, q, new_kv, new_kv, meta))


def run_kernel_bench(cfg: KernelBenchConfig) -> list[dict]:
    dev = torch.device(cfg.resolved_device)
    act_dtype = torch.bfloat16 if cfg.on_cuda else torch.float32
    kv_dtype = kv_dtype_from_name(cfg.kv_cache_dtype, act_dtype)
    use_triton = resolve_backend("auto", dev) == "triton"  # CUDA with Triton installed
    _, peak = device_description(cfg)
    measure = _timer(dev, cfg.repeats)
    limit = parse_size(cfg.max_kv_memory)
    H, Hq, D = cfg.num_kv_heads, cfg.num_kv_heads * cfg.group, cfg.head_dim
    contexts, batches = cfg.shapes()
    rows = []
    for context in contexts:
        for batch in batches:
            kv_bytes = 2 * batch * H * context * D * kv_dtype.itemsize
            contiguous_bytes = 2 * batch * H * context * D * act_dtype.itemsize
            # The pools, the torch backend's gathered copy, and the contiguous cache.
            if 2 * kv_bytes + contiguous_bytes > limit:
                continue
            gen = torch.Generator(device=dev).manual_seed(1)
            q = torch.randn(batch, Hq, D, generator=gen, device=dev).to(act_dtype)
            new_kv = torch.randn(batch, H, D, generator=gen, device=dev).to(act_dtype)
            # SDPA over a contiguous cache of the same shape: [B, H, context, D].
            k_flat = torch.randn(batch, H, context, D, generator=gen, device=dev).to(act_dtype)
            v_flat = torch.randn_like(k_flat)
            sdpa_s = measure(
                lambda q=q, k=k_flat, v=v_flat: F.scaled_dot_product_attention(
                    q.unsqueeze(2), k, v, enable_gqa=True
                )
            )
            del k_flat, v_flat
            for block_size in cfg.block_sizes:
                paged, slots = _filled_cache(cfg, batch, context, block_size, kv_dtype)
                row: dict = {"context": context, "batch": batch, "block_size": block_size}
                meta = _decode_step(paged, slots, [0] * batch)
                names = ["torch", "triton"] if use_triton else ["torch"]
                for name in names:
                    row[f"{name}_us"] = 1e6 * _time_step(measure, name, paged, q, new_kv, meta)
                if use_triton and cfg.collect_metric:
                    metric_meta = _decode_step(paged, slots, [2] * batch)
                    seconds = _time_step(measure, "triton", paged, q, new_kv, metric_meta)
                    row["triton_metric_us"] = 1e6 * seconds
                row["sdpa_contiguous_us"] = 1e6 * sdpa_s
                row["kv_mib"] = kv_bytes / 2**20
                timed = [n for n in (*names, "triton_metric") if f"{n}_us" in row]
                for name in [*timed, "sdpa_contiguous"]:
                    read = contiguous_bytes if name == "sdpa_contiguous" else kv_bytes
                    gbs = read / (row[f"{name}_us"] * 1e-6) / 1e9
                    row[f"{name}_gb_s"] = gbs
                    if peak is not None:
                        row[f"{name}_peak_share"] = gbs * 1e9 / peak
                rows.append(row)
                del paged, meta
    return rows
