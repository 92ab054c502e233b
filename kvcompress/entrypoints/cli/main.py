"""The ``kvcompress`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kvcompress.entrypoints.cli.bench import add_bench_parser
from kvcompress.entrypoints.cli.demo import add_demo_parser
from kvcompress.entrypoints.cli.eval import add_eval_parser
from kvcompress.entrypoints.cli.generate import add_generate_parser
from kvcompress.entrypoints.cli.inspect_kept import add_inspect_parser
from kvcompress.entrypoints.cli.serve import add_serve_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvcompress", description="KV-Compress: paged KV-cache compression per attention head"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(commands)
    add_generate_parser(commands)
    add_serve_parser(commands)
    add_eval_parser(commands)
    add_inspect_parser(commands)
    add_bench_parser(commands)
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
