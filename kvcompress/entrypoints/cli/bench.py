"""``kvcompress bench memory | decode | throughput | longctx | load | kernels``: figures
printed from real runs."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
from collections.abc import Iterator
from typing import TypeVar

from kvcompress.bench.decode import DecodeBenchConfig
from kvcompress.bench.kernels import KernelBenchConfig
from kvcompress.bench.load import LoadConfig
from kvcompress.bench.longctx import LongctxBenchConfig
from kvcompress.bench.memory import MemoryBenchConfig
from kvcompress.bench.throughput import ThroughputBenchConfig
from kvcompress.compress import exact_rates
from kvcompress.entrypoints.cli.args import (
    CHOICES,
    ENGINE_OPTIONS,
    add_compression_args,
    add_engine_args,
    compression_from_args,
    engine_config_from_args,
    parse_ints,
    parse_rates,
)

# The rates are swept; the other compression fields apply at every rate.
SWEPT = ("compression_rate", "max_cache_tokens")
T = TypeVar("T")
REPORT_HELP = "one JSON document on stdout"
CSV_HELP = "also write the rows as CSV"
DEVICE_HELP = "torch device (default: cuda if available, else cpu)"
# Config fields set by a --no-... flag: field -> option.
NEGATED = {"transformers_baseline": "no_transformers", "reference": "no_reference"}


def add_bench_parser(commands) -> None:
    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(
        dest="bench", required=True
    )
    memory = bench.add_parser("memory", help="physical memory freed vs KVs evicted")
    d = MemoryBenchConfig()
    memory.add_argument("--prompt-len", type=int, default=d.prompt_len)
    memory.add_argument("--num-seqs", type=int, default=d.num_seqs)
    memory.add_argument("--block-size", type=int, default=d.block_size)
    memory.add_argument("--rates", type=parse_rates, default=d.rates)
    memory.add_argument("--repeats", type=int, default=d.repeats)
    memory.add_argument(
        "--kv-cache-dtype",
        default=d.kv_cache_dtype,
        choices=tuple(c for c in CHOICES["kv_cache_dtype"] if c != "auto"),
        help="storage of K and V (default: %(default)s)",
    )
    memory.add_argument("--json", action="store_true", help=REPORT_HELP)
    add_compression_args(memory, "compression (at every rate)", exclude=SWEPT)
    memory.set_defaults(func=run_memory)

    decode = bench.add_parser("decode", help="tokens/s by batch size, ours vs transformers")
    d = DecodeBenchConfig()
    decode.add_argument("--batch-sizes", type=parse_ints, default=d.batch_sizes)
    decode.add_argument("--prompt-len", type=int, default=d.prompt_len)
    decode.add_argument("--output-len", type=int, default=d.output_len)
    decode.add_argument("--rate", type=float, default=d.rate, help="compression rate of 'on'")
    decode.add_argument("--model", default=d.model)
    decode.add_argument("--kv-cache-memory", default=d.kv_cache_memory)
    decode.add_argument("--no-transformers", action="store_true", help="skip the baseline")
    decode.add_argument("--device", default=d.device, help=DEVICE_HELP)
    add_dtype_args(decode, d)
    decode.add_argument(
        "--enforce-eager", action="store_true", help=ENGINE_OPTIONS["enforce_eager"]
    )
    decode.add_argument("--json", action="store_true", help=REPORT_HELP)
    add_compression_args(decode, "compression (of the 'on' runs)", exclude=SWEPT)
    decode.set_defaults(func=run_decode)

    tp = bench.add_parser("throughput", help="throughput at a fixed KV budget, by rate")
    d = ThroughputBenchConfig()
    tp.add_argument("--num-prompts", type=int, default=d.num_prompts)
    tp.add_argument("--input-len", type=int, default=d.input_len)
    tp.add_argument("--output-len", type=int, default=d.output_len)
    tp.add_argument("--rates", type=parse_rates, default=d.rates)
    tp.add_argument("--kv-cache-memory", default=d.kv_cache_memory)
    tp.add_argument("--model", default=d.model)
    tp.add_argument("--no-transformers", action="store_true", help="skip the baseline")
    tp.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=d.tensor_parallel_size,
        help="ranks the model is sharded over (the KV budget is per rank; the transformers "
        "baseline is skipped)",
    )
    tp.add_argument("--device", default=d.device, help=DEVICE_HELP)
    add_dtype_args(tp, d)
    tp.add_argument(
        "--decode-headroom",
        type=int,
        default=d.decode_headroom,
        help=ENGINE_OPTIONS["decode_headroom"],
    )
    tp.add_argument("--swap-space", default=d.swap_space, help=ENGINE_OPTIONS["swap_space"])
    tp.add_argument("--plot-dir", default=None, help="write throughput_speedup.png here")
    tp.add_argument("--json", action="store_true", help=REPORT_HELP)
    add_compression_args(tp, "compression (at every rate)", exclude=SWEPT)
    tp.set_defaults(func=run_throughput)

    lc = bench.add_parser(
        "longctx", help="prompts beyond the KV budget: peak memory, prefill time, agreement"
    )
    d = LongctxBenchConfig()
    lc.add_argument(
        "--lengths",
        type=parse_ints,
        default=d.lengths,
        help="prompt tokens, one request each (the longest capped so that prompt + output "
        "fits the context)",
    )
    lc.add_argument("--output-len", type=int, default=d.output_len, help="tokens generated")
    lc.add_argument(
        "--agreement-tokens",
        type=int,
        default=d.agreement_tokens,
        help="continuation tokens teacher-forced for top-1 agreement",
    )
    lc.add_argument("--kv-cache-memory", default=d.kv_cache_memory, help="the KV budget")
    lc.add_argument(
        "--max-cache-tokens",
        type=int,
        default=d.max_cache_tokens,
        help="average KVs kept per head (the compression budget)",
    )
    lc.add_argument(
        "--reference-memory",
        default=d.reference_memory,
        help="KV cache of the full-cache and one-shot reference engine",
    )
    lc.add_argument(
        "--no-reference", action="store_true", help="skip the agreement columns (no 2nd engine)"
    )
    lc.add_argument(
        "--prefill-chunk-size",
        type=int,
        default=d.prefill_chunk_size,
        help="prompt tokens per chunk (default: 512 on CPU, 2048 on accelerators)",
    )
    lc.add_argument(
        "--prefill-compression",
        default=d.prefill_compression,
        choices=CHOICES["prefill_compression"],
        help=ENGINE_OPTIONS["prefill_compression"],
    )
    lc.add_argument("--model", default=d.model)
    lc.add_argument("--device", default=d.device)
    lc.add_argument("--json", action="store_true", help=REPORT_HELP)
    lc.add_argument("--csv", metavar="PATH", help=CSV_HELP)
    add_compression_args(lc, "compression (of the budget runs)", exclude=SWEPT)
    lc.set_defaults(func=run_longctx)

    load = bench.add_parser("load", help="HTTP load test of the server, compression on vs off")
    d = LoadConfig()
    load.add_argument("--clients", type=int, default=d.clients, help="concurrent clients")
    load.add_argument("--duration", type=float, default=d.duration, help="seconds per rate")
    load.add_argument("--prompt-len", type=int, default=d.prompt_len, help="prompt tokens")
    load.add_argument("--max-tokens", type=int, default=d.max_tokens, help="tokens per request")
    load.add_argument("--rates", type=parse_rates, default=d.rates, help="server default rates")
    load.add_argument(
        "--oversized",
        type=int,
        default=d.oversized,
        help="requests with far too long prompts sent during each run; the row then splits "
        "the inter-token p90 into gaps during them and the rest",
    )
    load.add_argument(
        "--oversized-chars",
        type=int,
        default=d.oversized_chars,
        help="characters in each oversized prompt",
    )
    load.add_argument("--json", action="store_true", help=REPORT_HELP)
    # The default budget holds one uncompressed default request at a time.
    add_engine_args(load, kv_cache_memory="48MiB")
    add_compression_args(load, "compression (server defaults at every rate)", exclude=SWEPT)
    load.set_defaults(func=run_load)

    kernels = bench.add_parser("kernels", help="paged decode attention: time and GB/s")
    d = KernelBenchConfig()
    shapes = "KVs per head (default: 1024,4096,16384,32768 on CUDA, 256,1024 on CPU)"
    kernels.add_argument("--contexts", type=parse_ints, default=None, help=shapes)
    batches = "default: 1,8,64 on CUDA, 1,4 on CPU"
    kernels.add_argument("--batch-sizes", type=parse_ints, default=None, help=batches)
    kernels.add_argument("--block-sizes", type=parse_ints, default=d.block_sizes)
    kernels.add_argument("--num-kv-heads", type=int, default=d.num_kv_heads)
    kernels.add_argument("--group", type=int, default=d.group, help="query heads per KV head")
    kernels.add_argument("--head-dim", type=int, default=d.head_dim)
    kernels.add_argument(
        "--kv-cache-dtype", default=d.kv_cache_dtype, choices=("auto", "bfloat16", "float16", "fp8")
    )
    kernels.add_argument("--device", default=d.device, help=DEVICE_HELP)
    kernels.add_argument("--repeats", type=int, default=d.repeats)
    kernels.add_argument("--max-kv-memory", default=d.max_kv_memory)
    kernels.add_argument("--json", action="store_true", help=REPORT_HELP)
    kernels.set_defaults(func=run_kernels)


def add_dtype_args(parser: argparse.ArgumentParser, defaults) -> None:
    """``--dtype`` and ``--kv-cache-dtype``, as the engine takes them."""
    for name in ("dtype", "kv_cache_dtype"):
        flag = "--" + name.replace("_", "-")
        parser.add_argument(
            flag, default=getattr(defaults, name), choices=CHOICES[name], help=ENGINE_OPTIONS[name]
        )


def _config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """A benchmark config from the options named like its fields (the options were made
    from the same config's defaults); ``compression`` from the compression options."""
    options = vars(args)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {name: options[name] for name in names if name in options}
    values |= {name: not options[flag] for name, flag in NEGATED.items() if name in names}
    if "compression" in names:
        values["compression"] = exact_rates().with_overrides(compression_from_args(args))
    return cls(**values)


def run_memory(args: argparse.Namespace) -> int:
    from kvcompress.bench.memory import run_memory_bench
    from kvcompress.report import emit_report

    cfg = _config_from_args(MemoryBenchConfig, args)
    header = (
        f"memory benchmark: {cfg.num_seqs} sequences x {cfg.prompt_len} tokens, "
        f"{cfg.num_layers} layers x {cfg.num_kv_heads} KV heads x head dim {cfg.head_dim}, "
        f"block size {cfg.block_size}, {cfg.kv_cache_dtype} K and V, "
        f"policy {cfg.compression.policy}, scorer {cfg.compression.effective_scorer}, "
        f"protected window {cfg.compression.protected_window}; "
        "ms_per_million_kvs: scoring + planning + compaction"
    )
    emit_report(cfg, run_memory_bench(cfg), args.json, header)
    return 0


def run_decode(args: argparse.Namespace) -> int:
    from kvcompress.bench.decode import run_decode_bench
    from kvcompress.bench.engine_run import auto_device
    from kvcompress.report import emit_report

    cfg = _config_from_args(DecodeBenchConfig, args)
    header = (
        f"decode benchmark: prompts of {cfg.prompt_len} tokens, {cfg.output_len} generated, "
        f"compression 'on' = {cfg.compression.policy} at rate {cfg.rate}, device "
        f"{auto_device(cfg.device)}{', eager' if cfg.enforce_eager else ''}; tokens/s; "
        "on_compression_share: compression / (compression + decode steps)"
    )
    emit_report(cfg, run_decode_bench(cfg), args.json, header)
    return 0


def run_throughput(args: argparse.Namespace) -> int:
    from kvcompress.bench.throughput import plot_speedup, run_throughput_bench
    from kvcompress.report import emit_report

    cfg = _config_from_args(ThroughputBenchConfig, args)
    rows = run_throughput_bench(cfg)
    header = (
        f"throughput benchmark: {cfg.num_prompts} prompts x {cfg.input_len} tokens in, "
        f"{cfg.output_len} out, KV budget {cfg.kv_cache_memory}, "
        f"policy {cfg.compression.policy}"
    )
    if cfg.tensor_parallel_size > 1:
        header += f", {cfg.tensor_parallel_size} ranks (budget and peak_kv_bytes_rank<r> per rank)"
    if (cfg.dtype, cfg.kv_cache_dtype) != ("auto", "auto"):
        header += f", dtype {cfg.dtype}, KV cache dtype {cfg.kv_cache_dtype}"
    emit_report(cfg, rows, args.json, header)
    if args.plot_dir:
        print(f"plot: {plot_speedup(rows, args.plot_dir)}", file=sys.stderr)
    return 0


def run_longctx(args: argparse.Namespace) -> int:
    from kvcompress.bench.longctx import run_longctx_bench
    from kvcompress.report import emit_report, write_csv

    cfg = _config_from_args(LongctxBenchConfig, args)
    result = run_longctx_bench(cfg)
    e = result.engine
    agreement = (
        f"top-1 agreement with the full cache over {cfg.agreement_tokens} continuation tokens "
        f"(reference engine {cfg.reference_memory}): chunked under the budget vs prefilled "
        "whole and compressed once"
        if cfg.reference
        else "no agreement (--no-reference)"
    )
    header = (
        f"long-context benchmark: one request per prompt length, {cfg.output_len} tokens out, "
        f"KV budget {cfg.kv_cache_memory} ({e['num_blocks']} blocks of {e['bytes_per_block']} "
        f"bytes), max_cache_tokens {cfg.max_cache_tokens}, min_cache_tokens "
        f"{cfg.params.min_cache_tokens}, policy {cfg.params.policy}, prefill chunk "
        f"{e['chunk_size']} tokens compressed {cfg.prefill_compression}, context "
        f"{e['max_model_len']}; {agreement}"
    )
    emit_report({"longctx": cfg, "engine": e}, result.rows, args.json, header)
    if args.csv:
        print(f"wrote {write_csv(result.rows, args.csv)}", file=sys.stderr)
    return 0


def run_load(args: argparse.Namespace) -> int:
    from kvcompress.bench.load import ServerRun, run_load_bench
    from kvcompress.bench.workload import text_prompts
    from kvcompress.engine import AsyncLLMEngine, LLMEngine
    from kvcompress.entrypoints.openai.app import build_app, model_name
    from kvcompress.entrypoints.openai.serving import BackgroundServer
    from kvcompress.report import emit_report

    cfg = _config_from_args(LoadConfig, args)
    base = engine_config_from_args(args)

    @contextlib.contextmanager
    def serve(rate: float) -> Iterator[ServerRun]:
        rate_or_off = {"compression_rate": rate} if rate > 1 else {"compression_rate": None}
        config = dataclasses.replace(base, compression=base.compression.with_overrides(rate_or_off))
        llm = LLMEngine(config)
        # Distinct prompts per client request; token ids so the length is exact.
        prompts = text_prompts(llm.tokenizer, max(4 * cfg.clients, 16), cfg.prompt_len)
        engine = AsyncLLMEngine(llm)
        with BackgroundServer(build_app(engine, model_name(base.model))) as server:
            yield ServerRun(server.url, engine.stats, prompts)

    logging.basicConfig(level=logging.WARNING)
    rows = run_load_bench(cfg, serve, log=lambda msg: print(msg, file=sys.stderr))
    header = (
        f"load benchmark: {cfg.clients} streaming clients x {cfg.duration:g} s per rate, "
        f"prompts of {cfg.prompt_len} tokens, {cfg.max_tokens} tokens out, "
        f"KV budget {base.kv_cache_memory} bytes, policy {base.compression.policy}; "
        "latencies in seconds"
    )
    emit_report({"load": cfg, "engine": base}, rows, args.json, header)
    return 0


def run_kernels(args: argparse.Namespace) -> int:
    from kvcompress.bench.kernels import device_description, run_kernel_bench
    from kvcompress.report import emit_report

    cfg = _config_from_args(KernelBenchConfig, args)
    name, peak = device_description(cfg)
    peak_text = f"peak {peak / 1e12:.3g} TB/s" if peak else "peak bandwidth unknown"
    which = "triton and torch backends" if cfg.on_cuda else "torch backend only (no CUDA)"
    header = (
        f"kernel benchmark on {name} ({peak_text}): one layer's paged decode, {which}, vs SDPA "
        f"on a contiguous cache; {cfg.num_kv_heads} KV heads x {cfg.group} query heads each, "
        f"head dim {cfg.head_dim}; times in microseconds, bandwidth from the K/V bytes read"
    )
    emit_report(cfg, run_kernel_bench(cfg), args.json, header)
    return 0
