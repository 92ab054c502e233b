"""``kvcompress bench decode``: tokens/s at several batch sizes, ours vs transformers.

Every batch size runs three ways on the same prompts, in one process: our engine with
compression off, our engine with compression on, and transformers' ``generate`` on a model
holding the very same weights. Figures are printed as ratios measured in this one run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kvcompress.bench.engine_run import auto_device, run_all
from kvcompress.bench.workload import text_prompts
from kvcompress.compress import CompressionParams, exact_rates
from kvcompress.engine import EngineConfig, LLMEngine


@dataclass(frozen=True)
class DecodeBenchConfig:
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    prompt_len: int = 512
    output_len: int = 64
    rate: float = 8.0
    model: str | None = None
    kv_cache_memory: str = "2GiB"
    transformers_baseline: bool = True
    device: str | None = None  # None: cuda if available
    # The engine's (auto: bfloat16 on CUDA, float32 on CPU; the KVs in the model's dtype).
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    enforce_eager: bool = False  # no CUDA graphs for the engine's decode steps
    # What 'on' uses besides the rate.
    compression: CompressionParams = field(default_factory=exact_rates)

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        if self.prompt_len < 1 or self.output_len < 2:
            raise ValueError("prompt_len must be >= 1 and output_len >= 2")
        if self.rate < 1:
            raise ValueError(f"rate must be >= 1, got {self.rate}")


def _transformers_run(model, prompts: list[list[int]], output_len: int) -> tuple[float, float]:
    """(total seconds, prefill seconds) of greedy ``generate`` on one unpadded batch."""
    device = next(model.parameters()).device
    ids = torch.tensor(prompts, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        model(ids[:1, :8], logits_to_keep=1)  # warm-up: kernel selection, first allocations
        sync()
        start = time.perf_counter()
        model(ids, logits_to_keep=1)  # the prefill alone, to split generate's time
        sync()
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        # min_new_tokens: exactly output_len tokens, like our ignore_eos.
        model.generate(
            ids,
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=False,
            attention_mask=torch.ones_like(ids),
            pad_token_id=0,  # unpadded batch: only silences the padding warning
        )
        sync()
        total = time.perf_counter() - start
    return total, prefill


def run_decode_bench(cfg: DecodeBenchConfig) -> list[dict]:
    engine = LLMEngine(
        EngineConfig(
            model=cfg.model,
            kv_cache_memory=cfg.kv_cache_memory,
            max_num_seqs=max(cfg.batch_sizes),
            max_num_batched_tokens=max(cfg.batch_sizes) * cfg.prompt_len,
            device=auto_device(cfg.device),
            dtype=cfg.dtype,
            kv_cache_dtype=cfg.kv_cache_dtype,
            enforce_eager=cfg.enforce_eager,
        )
    )
    hf = engine.to_transformers() if cfg.transformers_baseline else None
    modes = {
        "off": cfg.compression.with_overrides(policy="full", compression_rate=None),
        "on": cfg.compression.with_overrides(compression_rate=cfg.rate),
    }
    rows = []
    for batch in cfg.batch_sizes:
        prompts = text_prompts(engine.tokenizer, batch, cfg.prompt_len)
        run_all(engine, prompts[:1], 2, modes["off"])  # warm-up: first-touch allocations
        row: dict = {"batch": batch}
        for name, params in modes.items():
            r = run_all(engine, prompts, cfg.output_len, params)
            decode_tokens = batch * (cfg.output_len - 1)  # the first token comes from prefill
            row[f"{name}_total_tok_s"] = r.total_tokens_per_s
            row[f"{name}_decode_tok_s"] = decode_tokens / r.decode_seconds
            if name == "on":
                # Compressing (after the prefill and as the sequences grow) against the
                # decode steps' own time.
                row["on_compression_s"] = r.compression_seconds
                row["on_compression_share"] = r.compression_seconds / (
                    r.compression_seconds + r.decode_seconds
                )
        if hf is not None:
            total, prefill = _transformers_run(hf, prompts, cfg.output_len)
            tokens = batch * (cfg.prompt_len + cfg.output_len)
            row["hf_total_tok_s"] = tokens / total
            row["hf_decode_tok_s"] = batch * (cfg.output_len - 1) / max(total - prefill, 1e-9)
            row["off_vs_hf_total"] = row["off_total_tok_s"] / row["hf_total_tok_s"]
            row["off_vs_hf_decode"] = row["off_decode_tok_s"] / row["hf_decode_tok_s"]
        row["on_vs_off_decode"] = row["on_decode_tok_s"] / row["off_decode_tok_s"]
        rows.append(row)
    return rows
