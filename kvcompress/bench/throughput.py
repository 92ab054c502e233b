"""``kvcompress bench throughput``: what compression buys at a fixed KV memory budget.

N prompts are submitted at once to an engine whose KV cache holds only a few uncompressed
sequences. Without compression the batch stays small; compressing each sequence right after
its prefill lets more of them decode together. Prefill costs the same at every rate, so the
run also prints the speedup a zero-cost decode would give (the prefill ceiling).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvcompress.bench.engine_run import RunResult, auto_device, run_all
from kvcompress.bench.workload import text_prompts
from kvcompress.cache import parse_size
from kvcompress.compress import CompressionParams, exact_rates
from kvcompress.engine import EngineConfig, LLMEngine


@dataclass(frozen=True)
class ThroughputBenchConfig:
    num_prompts: int = 32
    input_len: int = 1024
    output_len: int = 512
    rates: tuple[float, ...] = (1, 8, 64)
    kv_cache_memory: str = "200MiB"
    model: str | None = None
    transformers_baseline: bool = True  # skipped under tensor parallelism
    # Ranks the model is sharded over; kv_cache_memory is then each rank's budget.
    tensor_parallel_size: int = 1
    # The engine's (auto: float32 on CPU, bfloat16 on CUDA; the KVs in the model's dtype).
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    device: str | None = None  # None: cuda if available
    # Admission and preemption (the engine's; 0 headroom overcommits, so that sequences are
    # preempted, and then swapped out or, with swap_space 0, recomputed).
    decode_headroom: int = 256
    swap_space: str = "4GiB"
    # What every rate uses besides it.
    compression: CompressionParams = field(default_factory=exact_rates)

    def __post_init__(self) -> None:
        if self.num_prompts < 1 or self.input_len < 1 or self.output_len < 1:
            raise ValueError("num_prompts, input_len and output_len must be >= 1")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if not self.rates or min(self.rates) < 1:
            raise ValueError(f"rates must be >= 1, got {self.rates}")
        parse_size(self.kv_cache_memory)


def _row(rate, result: RunResult, bytes_per_block: int) -> dict:
    return {
        "rate": rate,
        "total_tokens_per_s": result.total_tokens_per_s,
        "output_tokens_per_s": result.output_tokens_per_s,
        "peak_concurrent_seqs": result.peak_running,
        "peak_kv_bytes": result.peak_blocks_used * bytes_per_block,
        **{
            f"peak_kv_bytes_rank{r}": blocks * bytes_per_block
            for r, blocks in enumerate(result.peak_blocks_per_rank)
        },
        "compression_s": result.compression_seconds,
        "prefill_s": result.prefill_seconds,
        "seconds": result.seconds,
        "preemptions": result.preemptions,
        "swaps": result.swaps,
    }


def _transformers_baseline(engine: LLMEngine, prompts, cfg: ThroughputBenchConfig) -> dict:
    """transformers' ``generate`` in batches as large as its contiguous cache fits in the
    same KV budget (every sequence reserves room for input + output)."""
    mc = engine.model_config
    element = torch.empty((), dtype=engine.config.dtype).element_size()
    per_seq = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * element
    per_seq *= cfg.input_len + cfg.output_len
    batch = max(1, parse_size(cfg.kv_cache_memory) // per_seq)
    hf = engine.to_transformers()
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i : i + batch], device=engine.device)
            hf.generate(
                ids,
                max_new_tokens=cfg.output_len,
                min_new_tokens=cfg.output_len,
                do_sample=False,
                attention_mask=torch.ones_like(ids),
                pad_token_id=0,  # unpadded batches: only silences the padding warning
            )
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    seconds = time.perf_counter() - start
    out = len(prompts) * cfg.output_len
    return {
        "rate": "transformers",
        "total_tokens_per_s": (len(prompts) * cfg.input_len + out) / seconds,
        "output_tokens_per_s": out / seconds,
        "peak_concurrent_seqs": batch,
        "peak_kv_bytes": batch * per_seq,
        "compression_s": 0.0,
        "prefill_s": float("nan"),
        "seconds": seconds,
        "preemptions": 0,
        "swaps": 0,
    }


def run_throughput_bench(cfg: ThroughputBenchConfig) -> list[dict]:
    engine = LLMEngine(
        EngineConfig(
            model=cfg.model,
            kv_cache_memory=cfg.kv_cache_memory,
            max_num_seqs=cfg.num_prompts,
            max_num_batched_tokens=cfg.input_len,
            tensor_parallel_size=cfg.tensor_parallel_size,
            dtype=cfg.dtype,
            kv_cache_dtype=cfg.kv_cache_dtype,
            device=auto_device(cfg.device),
            decode_headroom=cfg.decode_headroom,
            swap_space=cfg.swap_space,
        )
    )
    try:
        return _run(engine, cfg)
    finally:
        engine.close()


def _run(engine: LLMEngine, cfg: ThroughputBenchConfig) -> list[dict]:
    prompts = text_prompts(engine.tokenizer, cfg.num_prompts, cfg.input_len)
    run_all(engine, prompts[:1], 2, CompressionParams(policy="full"))  # warm-up
    bytes_per_block = engine.capacity().bytes_per_block
    rows = []
    for rate in cfg.rates:
        params = cfg.compression.with_overrides(compression_rate=float(rate))
        if rate == 1:
            params = params.with_overrides(policy="full", compression_rate=None)
        rows.append(_row(rate, run_all(engine, prompts, cfg.output_len, params), bytes_per_block))
    base = rows[0] if cfg.rates[0] == 1 else None
    for row in rows:
        if base is not None:
            row["speedup"] = row["total_tokens_per_s"] / base["total_tokens_per_s"]
            row["output_speedup"] = row["output_tokens_per_s"] / base["output_tokens_per_s"]
            # With decode for free, the run would take its prefill (+ compression) time.
            floor = row["prefill_s"] + row["compression_s"]
            row["prefill_ceiling"] = base["seconds"] / floor
            row["share_of_ceiling"] = row["speedup"] / row["prefill_ceiling"]
    # transformers' baseline runs the whole model on one device: no match for several ranks.
    if cfg.transformers_baseline and cfg.tensor_parallel_size == 1:
        hf_row = _transformers_baseline(engine, prompts, cfg)
        if base is not None:
            hf_row["speedup"] = hf_row["total_tokens_per_s"] / base["total_tokens_per_s"]
            hf_row["output_speedup"] = hf_row["output_tokens_per_s"] / base["output_tokens_per_s"]
        rows.append(hf_row)
    return rows


def plot_speedup(rows: list[dict], plot_dir: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = [r for r in rows if isinstance(r["rate"], int | float) and "speedup" in r]
    if not ours:
        raise ValueError("a speedup plot needs rate 1 (the baseline) among the rates")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["rate"] for r in ours], [r["speedup"] for r in ours], "o-", label="total tokens/s")
    ax.plot(
        [r["rate"] for r in ours],
        [r["output_speedup"] for r in ours],
        "s--",
        label="output tokens/s",
    )
    ax.plot(
        [r["rate"] for r in ours],
        [r["prefill_ceiling"] for r in ours],
        ":",
        label="prefill ceiling",
    )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("compression rate")
    ax.set_ylabel("speedup over no compression")
    ax.set_title("Throughput at a fixed KV budget")
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(plot_dir)
    path.mkdir(parents=True, exist_ok=True)
    out = path / "throughput_speedup.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
