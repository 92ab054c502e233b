"""``kvcompress generate``: one prompt in, text and KV statistics out."""

from __future__ import annotations

import argparse
import sys
import time

from kvcompress.cache import format_size
from kvcompress.entrypoints.cli.args import (
    add_compression_args,
    add_engine_args,
    engine_config_from_args,
)
from kvcompress.report import print_json


def add_generate_parser(commands) -> None:
    p = commands.add_parser("generate", help="generate text for one prompt")
    p.add_argument("prompt", nargs="?", help="the prompt (or use --prompt-file, or stdin)")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed-sampling", type=int, default=None, dest="sampling_seed")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    add_engine_args(p)
    add_compression_args(p)
    p.set_defaults(func=run_generate)


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise ValueError("give a prompt or --prompt-file, not both")
    if args.prompt_file is not None:
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    if args.prompt is not None:
        return args.prompt
    if sys.stdin.isatty():
        raise ValueError("no prompt: give one as an argument, with --prompt-file, or on stdin")
    return sys.stdin.read()


def run_generate(args: argparse.Namespace) -> int:
    from kvcompress.engine import LLMEngine, SamplingParams

    prompt = read_prompt(args)
    sampling = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.sampling_seed,
    )
    engine = LLMEngine(engine_config_from_args(args, max_num_seqs=1))
    tokens = (
        engine.apply_chat_template([{"role": "user", "content": prompt}]) if args.chat else prompt
    )
    start = time.perf_counter()
    engine.add_request(tokens, sampling)
    final = [out for out in engine.run() if out.finished][-1]
    seconds = time.perf_counter() - start
    kv = final.kv
    if args.json:
        print_json(
            {
                "text": final.text,
                "prompt_tokens": final.prompt_tokens,
                "completion_tokens": len(final.token_ids),
                "finish_reason": final.finish_reason,
                "seconds": seconds,
                "kv": kv.as_dict(),
            }
        )
        return 0
    print(final.text)
    bytes_per_kv = engine.capacity().bytes_per_kv
    used = format_size(kv.physical_kvs * bytes_per_kv)
    uncompressed = format_size(kv.kvs_seen * bytes_per_kv)
    print(
        f"\n[{final.prompt_tokens} prompt + {len(final.token_ids)} generated tokens in "
        f"{seconds:.1f} s | KVs kept {kv.kvs_kept:,} of {kv.kvs_seen:,} "
        f"(rate {kv.compression_rate:.2f}x) | KV memory {used} vs {uncompressed} uncompressed]",
        file=sys.stderr,
    )
    return 0
