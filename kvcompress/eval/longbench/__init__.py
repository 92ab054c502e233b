"""LongBench-format datasets read from local JSONL files: loading, prompts, scoring.

Nothing is downloaded: the user points `data_dir` at a folder with one file per subset,
``<subset>.jsonl`` (LongBench) or ``<subset>_e.jsonl`` (LongBench-E, the length-balanced
variant). Each line is an object with ``input``, ``context``, ``answers``, ``length``,
``dataset``, ``language``, ``all_classes`` and ``_id``.

Prompts are split in two, `context` then `question`, with the instructions that matter
for answering repeated in the question part, so that a caller can prefill (and compress)
the long context before the question is known; ``prompt.text`` is their concatenation.

Chinese subsets are not supported: scoring them needs jieba word segmentation, which
this package does not depend on. Asking for one raises `UnsupportedSubsetError`.

Modules: `subsets` (the table of subsets), `data` (loading), `prompts` and `scoring`.
"""

from kvcompress.eval.longbench.data import LongBenchExample, available_subsets, load_longbench
from kvcompress.eval.longbench.prompts import (
    LongBenchPrompt,
    fit_example,
    format_prompt,
    truncate_middle,
)
from kvcompress.eval.longbench.scoring import (
    LENGTH_BUCKETS,
    METRICS,
    score_longbench,
    score_longbench_e,
)
from kvcompress.eval.longbench.subsets import (
    CHINESE_SUBSETS,
    SUBSETS,
    SubsetSpec,
    UnsupportedSubsetError,
)

__all__ = [
    "CHINESE_SUBSETS",
    "LENGTH_BUCKETS",
    "METRICS",
    "SUBSETS",
    "LongBenchExample",
    "LongBenchPrompt",
    "SubsetSpec",
    "UnsupportedSubsetError",
    "available_subsets",
    "fit_example",
    "format_prompt",
    "load_longbench",
    "score_longbench",
    "score_longbench_e",
    "truncate_middle",
]
