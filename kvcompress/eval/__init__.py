"""Evaluation: policy x rate sweeps in our engine, and the data and metrics they use.

Data (no model code): synthetic RULER-style tasks (`ruler`), LongBench files (`longbench`),
natural text (`texts`) and metrics (`scoring`). Sweeps: the grid (`sweep`), prompts as token
ids (`prompts`), the job driver (`jobs`), the generation suites (`suites`), the natural-text
suite (`fidelity`), results (`results`) and plots (`plots`); which tokens of chosen
spans each head kept (`kept_spans`, for ``kvcompress inspect``).

Importing this package is cheap: torch, rouge-score and rapidfuzz are imported only by the
metrics that use them, and the sweep names below are loaded on first use.
"""

import importlib

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
from kvcompress.eval.prompts import PromptIds, encode_prompt, split_answer_prefix
from kvcompress.eval.ruler import TASKS, RulerConfig, Sample, generate_sample, generate_tasks
from kvcompress.eval.scoring import (
    mean_kl,
    score_ruler,
    string_match_all,
    string_match_part,
    top1_agreement,
)
from kvcompress.eval.texts import pydoc_text, read_text, text_slice

# Names whose modules import torch (through the engine's compression schema): loaded lazily.
_LAZY: dict[str, tuple[str, ...]] = {
    "kvcompress.eval.sweep": (
        "DEFAULT_POLICIES",
        "DEFAULT_RATES",
        "FULL",
        "SWEPT_FIELDS",
        "Setting",
        "SweepConfig",
        "Variant",
        "parse_variant",
    ),
    "kvcompress.eval.results": ("EvalResult", "KeptGrid", "Row", "format_cell"),
    "kvcompress.eval.jobs": ("Job", "run_jobs"),
    "kvcompress.eval.suites": ("LongBenchSpec", "RulerSpec", "run_longbench", "run_ruler"),
    "kvcompress.eval.fidelity": ("FidelitySpec", "run_fidelity"),
    "kvcompress.eval.plots": ("plot_explanation", "write_plots"),
    "kvcompress.eval.kept_spans": (
        "Explanation",
        "KeptSource",
        "Span",
        "explain",
        "explanation_rows",
        "spans_of_text",
        "tokens_overlapping",
    ),
}
_LAZY_MODULE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    module = _LAZY_MODULE.get(name)
    if module is None:
        raise AttributeError(f"module 'kvcompress.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "SUBSETS",
    "TASKS",
    "LongBenchExample",
    "LongBenchPrompt",
    "PromptIds",
    "RulerConfig",
    "Sample",
    "UnsupportedSubsetError",
    "available_subsets",
    "encode_prompt",
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
    "split_answer_prefix",
    "string_match_all",
    "string_match_part",
    "text_slice",
    "top1_agreement",
    *_LAZY_MODULE,
]
