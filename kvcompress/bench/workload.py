"""Benchmark workloads: prompts of exact token lengths cut from natural text."""

from __future__ import annotations

from kvcompress.eval import pydoc_text


def text_prompts(tokenizer, num_prompts: int, input_len: int) -> list[list[int]]:
    """``num_prompts`` distinct prompts of exactly ``input_len`` tokens of English prose."""
    ids = tokenizer(pydoc_text(), add_special_tokens=False)["input_ids"]
    if len(ids) < input_len:
        raise ValueError(f"input_len {input_len} exceeds the {len(ids)}-token text source")
    stride = max(1, (len(ids) - input_len) // max(1, num_prompts))
    return [ids[i * stride : i * stride + input_len] for i in range(num_prompts)]
