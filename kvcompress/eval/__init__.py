"""Evaluation data: synthetic RULER-style tasks, LongBench files, metrics, natural text.

This package holds no model code. Importing it is cheap: torch, rouge-score and
rapidfuzz are imported only by the metrics that use them.
"""

from kvcompress.eval.longbench import (
    SUBSETS,
    LongBenchExample,
    LongBenchPrompt,
    UnsupportedSubsetError,
    available_subsets,
    format_prompt,
    load_longbench,
    score_longbench,
    score_longbench_e,
)
from kvcompress.eval.ruler import TASKS, RulerConfig, Sample, generate_sample, generate_tasks
from kvcompress.eval.scoring import (
    mean_kl,
    score_ruler,
    string_match_all,
    string_match_part,
    top1_agreement,
)
from kvcompress.eval.texts import pydoc_text, read_text, text_slice

__all__ = [
    "SUBSETS",
    "TASKS",
    "LongBenchExample",
    "LongBenchPrompt",
    "RulerConfig",
    "Sample",
    "UnsupportedSubsetError",
    "available_subsets",
    "format_prompt",
    "generate_sample",
    "generate_tasks",
    "load_longbench",
    "mean_kl",
    "pydoc_text",
    "read_text",
    "score_longbench",
    "score_longbench_e",
    "score_ruler",
    "string_match_all",
    "string_match_part",
    "text_slice",
    "top1_agreement",
]
