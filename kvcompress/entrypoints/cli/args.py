"""Command-line arguments shared by the commands that build an engine."""

from __future__ import annotations

import argparse

from kvcompress.compress import METRICS, POLICIES, CompressionParams


def parse_rates(text: str) -> tuple[float, ...]:
    """``"1,2,4"`` -> ``(1, 2, 4)``: compression rates (numbers >= 1) for ``--rates``."""
    try:
        rates = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        message = f"rates must be comma-separated numbers: {text!r}"
        raise argparse.ArgumentTypeError(message) from err
    if not rates or any(not r >= 1 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be numbers >= 1: {text!r}")
    return tuple(int(r) if r.is_integer() else r for r in rates)


def add_engine_args(parser: argparse.ArgumentParser, kv_cache_memory: str = "1GiB") -> None:
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--model", default=None, help="HF model dir or .gguf file (default: SmolLM2-135M-Instruct)"
    )
    group.add_argument(
        "--kv-cache-memory", default=kv_cache_memory, help="KV cache budget, e.g. 2GiB"
    )
    group.add_argument("--block-size", type=int, default=16)
    group.add_argument("--max-num-seqs", type=int, default=64)
    group.add_argument("--max-model-len", type=int, default=None)
    group.add_argument("--device", default="cpu")
    group.add_argument("--seed", type=int, default=0)


def add_compression_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("compression (defaults for every request)")
    group.add_argument("--policy", default="kvcompress", choices=sorted(POLICIES))
    budget = group.add_mutually_exclusive_group()
    budget.add_argument(
        "--compression-rate", type=float, default=None, help="keep about 1/C of the KVs"
    )
    budget.add_argument(
        "--max-cache-tokens", type=int, default=None, help="average KVs kept per head"
    )
    group.add_argument("--protected-window", type=int, default=32)
    group.add_argument("--sinks", type=int, default=0)
    group.add_argument("--metric", default="l2-sum", choices=METRICS)
    group.add_argument("--compress-once", action="store_true")
    group.add_argument("--compression-interval", type=int, default=None)


def compression_from_args(args: argparse.Namespace) -> CompressionParams:
    return CompressionParams(
        policy=args.policy,
        compression_rate=args.compression_rate,
        max_cache_tokens=args.max_cache_tokens,
        protected_window=args.protected_window,
        sinks=args.sinks,
        metric=args.metric,
        compress_once=args.compress_once,
        compression_interval=args.compression_interval,
    )


def engine_config_from_args(args: argparse.Namespace, **overrides):
    from kvcompress.engine import EngineConfig

    values = dict(
        model=args.model,
        kv_cache_memory=args.kv_cache_memory,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        device=args.device,
        seed=args.seed,
    )
    if "compression" not in overrides:  # commands without compression flags pass their own
        values["compression"] = compression_from_args(args)
    values.update(overrides)
    return EngineConfig(**values)
