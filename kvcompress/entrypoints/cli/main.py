"""The ``kvcompress`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kvcompress.entrypoints.cli.args import parse_rates
from kvcompress.entrypoints.cli.demo import add_demo_parser
from kvcompress.entrypoints.cli.eval import add_eval_parser
from kvcompress.entrypoints.cli.generate import add_generate_parser
from kvcompress.entrypoints.cli.serve import add_load_parser, add_serve_parser


def _bench_memory(args: argparse.Namespace) -> int:
    from kvcompress.bench.memory import MemoryBenchConfig, run_memory_bench
    from kvcompress.bench.report import emit_report

    cfg = MemoryBenchConfig(
        prompt_len=args.prompt_len,
        num_seqs=args.num_seqs,
        block_size=args.block_size,
        rates=args.rates,
        protected_window=args.protected_window,
        policy=args.policy,
        repeats=args.repeats,
    )
    header = (
        f"memory benchmark: {cfg.num_seqs} sequences x {cfg.prompt_len} tokens, "
        f"{cfg.num_layers} layers x {cfg.num_kv_heads} KV heads x head dim {cfg.head_dim}, "
        f"block size {cfg.block_size}, policy {cfg.policy}, "
        f"protected window {cfg.protected_window}"
    )
    emit_report(cfg, run_memory_bench(cfg), args.json, header)
    return 0


def _bench_decode(args: argparse.Namespace) -> int:
    from kvcompress.bench.decode import DecodeBenchConfig, run_decode_bench
    from kvcompress.bench.report import emit_report

    cfg = DecodeBenchConfig(
        batch_sizes=tuple(int(b) for b in args.batch_sizes),
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        rate=args.rate,
        model=args.model,
        kv_cache_memory=args.kv_cache_memory,
        transformers_baseline=not args.no_transformers,
    )
    header = (
        f"decode benchmark: prompts of {cfg.prompt_len} tokens, {cfg.output_len} generated, "
        f"compression 'on' = kvcompress at rate {cfg.rate}; tokens/s"
    )
    emit_report(cfg, run_decode_bench(cfg), args.json, header)
    return 0


def _bench_throughput(args: argparse.Namespace) -> int:
    from kvcompress.bench.report import emit_report
    from kvcompress.bench.throughput import (
        ThroughputBenchConfig,
        plot_speedup,
        run_throughput_bench,
    )

    cfg = ThroughputBenchConfig(
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        rates=args.rates,
        kv_cache_memory=args.kv_cache_memory,
        policy=args.policy,
        protected_window=args.protected_window,
        model=args.model,
        transformers_baseline=not args.no_transformers,
    )
    rows = run_throughput_bench(cfg)
    header = (
        f"throughput benchmark: {cfg.num_prompts} prompts x {cfg.input_len} tokens in, "
        f"{cfg.output_len} out, KV budget {cfg.kv_cache_memory}, policy {cfg.policy}"
    )
    emit_report(cfg, rows, args.json, header)
    if args.plot_dir:
        print(f"plot: {plot_speedup(rows, args.plot_dir)}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvcompress", description="KV-Compress: paged KV-cache compression per attention head"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(commands)
    add_generate_parser(commands)
    add_serve_parser(commands)
    add_eval_parser(commands)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(
        dest="bench", required=True
    )
    memory = bench.add_parser("memory", help="physical memory freed vs KVs evicted")
    memory.add_argument("--prompt-len", type=int, default=2048)
    memory.add_argument("--num-seqs", type=int, default=8)
    memory.add_argument("--block-size", type=int, default=16)
    memory.add_argument("--rates", type=parse_rates, default=(1, 2, 4, 8, 16, 32, 64))
    memory.add_argument("--protected-window", type=int, default=32)
    memory.add_argument("--policy", default="kvcompress")
    memory.add_argument("--repeats", type=int, default=3)
    memory.add_argument("--json", action="store_true", help="one JSON document on stdout")
    memory.set_defaults(func=_bench_memory)

    decode = bench.add_parser("decode", help="tokens/s by batch size, ours vs transformers")
    decode.add_argument("--batch-sizes", type=parse_rates, default=(1, 8, 32))
    decode.add_argument("--prompt-len", type=int, default=512)
    decode.add_argument("--output-len", type=int, default=64)
    decode.add_argument("--rate", type=float, default=8.0)
    decode.add_argument("--model", default=None)
    decode.add_argument("--kv-cache-memory", default="2GiB")
    decode.add_argument("--no-transformers", action="store_true", help="skip the baseline")
    decode.add_argument("--json", action="store_true", help="one JSON document on stdout")
    decode.set_defaults(func=_bench_decode)

    tp = bench.add_parser("throughput", help="throughput at a fixed KV budget, by rate")
    tp.add_argument("--num-prompts", type=int, default=32)
    tp.add_argument("--input-len", type=int, default=1024)
    tp.add_argument("--output-len", type=int, default=512)
    tp.add_argument("--rates", type=parse_rates, default=(1, 8, 64))
    tp.add_argument("--kv-cache-memory", default="200MiB")
    tp.add_argument("--policy", default="kvcompress")
    tp.add_argument("--protected-window", type=int, default=32)
    tp.add_argument("--model", default=None)
    tp.add_argument("--no-transformers", action="store_true", help="skip the baseline")
    tp.add_argument("--plot-dir", default=None, help="write throughput_speedup.png here")
    tp.add_argument("--json", action="store_true", help="one JSON document on stdout")
    tp.set_defaults(func=_bench_throughput)

    add_load_parser(bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        parser.exit(2, f"kvcompress: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
