"""Write a needle-in-a-haystack prompt of about N tokens of the default model to stdout.

    python examples/needle_prompt.py --tokens 8000 > needle_8k.txt
    kvcompress generate --prompt-file needle_8k.txt --kv-cache-memory 24MiB \
        --max-cache-tokens 256 --max-tokens 16

The prompt is RULER's ``niah_single`` task (a number hidden in an essay-like haystack, then
the question); the expected answer goes to stderr.
"""

from __future__ import annotations

import argparse
import sys

from kvcompress.engine import EngineConfig, LLMEngine
from kvcompress.eval import generate_sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8000, help="prompt length in tokens")
    parser.add_argument("--task", default="niah_single", help="RULER task")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tokenizer = LLMEngine(EngineConfig(kv_cache_memory="8MiB")).tokenizer
    sample = generate_sample(args.task, args.tokens, tokenizer, seed=args.seed)
    sys.stdout.write(sample.prompt)
    print(f"{sample.length_tokens} tokens; expected answer: {sample.answers}", file=sys.stderr)


if __name__ == "__main__":
    main()
