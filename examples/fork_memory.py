"""Show that n > 1 choices share their prompt's KV blocks: one completion with ``n`` choices
against a running server, watching its ``/metrics`` while the choices decode.

    kvcompress serve --port 8000 &
    python examples/fork_memory.py --base-url http://127.0.0.1:8000 --prompt-tokens 2000 \
        --n 4 --compression-rate 4

It prints the KV blocks in use (physical, ``kv_blocks_used``) and referenced by the choices'
block tables (``kv_blocks_held``, a shared block once per table) at the moment the most
blocks were referenced, then each choice's ``kv`` statistics when it ended (the last to end
shares nothing any more).
"""

from __future__ import annotations

import argparse
import threading

import httpx
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

WATCHED = ("kv_blocks_used", "kv_blocks_held", "kv_blocks_shared", "requests_running")


def scrape(client: httpx.Client) -> dict[str, float]:
    """The watched gauges of one /metrics scrape."""
    values = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        name = family.name.removeprefix("kvcompress_")
        if name in WATCHED:
            values[name] = family.samples[0].value
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--prompt-tokens", type=int, default=2000, help="about this many")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--compression-rate", type=float, default=4.0)
    args = parser.parse_args()

    # Plain prose of about the requested length (the default tokenizer: ~1.3 tokens a word).
    sentence = "The river bends past the old mill where the miller kept his ledgers. "
    prompt = sentence * max(1, args.prompt_tokens // 15)
    headers = {"Authorization": f"Bearer {args.api_key}"}
    peak: dict[str, float] = {}
    done = threading.Event()

    def watch() -> None:
        with httpx.Client(base_url=args.base_url, headers=headers) as http:
            while not done.is_set():
                values = scrape(http)
                if values.get("kv_blocks_held", 0) > peak.get("kv_blocks_held", -1):
                    peak.update(values)
                done.wait(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    client = OpenAI(base_url=f"{args.base_url}/v1", api_key=args.api_key)
    try:
        reply = client.completions.create(
            model=client.models.list().data[0].id,
            prompt=prompt,
            n=args.n,
            max_tokens=args.max_tokens,
            temperature=1.0,
            seed=0,
            extra_body={"compression_rate": args.compression_rate, "ignore_eos": True},
        )
    finally:
        done.set()
        watcher.join()
    print(f"prompt tokens {reply.usage.prompt_tokens}, n={args.n}, rate {args.compression_rate}")
    print(
        "at the most referenced moment: " + ", ".join(f"{k} {int(peak.get(k, 0))}" for k in WATCHED)
    )
    shown = ("blocks", "blocks_shared", "kvs_kept", "kvs_seen", "compression_rate")
    for choice in sorted(reply.choices, key=lambda c: c.index):
        kv = choice.model_dump()["kv"]
        stats = ", ".join(
            f"{k} {kv[k]:.2f}" if k == "compression_rate" else f"{k} {kv[k]}" for k in shown
        )
        print(f"choice {choice.index} at its end: {stats}")


if __name__ == "__main__":
    main()
