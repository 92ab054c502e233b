"""Metrics: RULER string matching, LongBench task metrics, and logit fidelity.

Text metrics take one prediction and one reference and return a score in [0, 1]; the
dataset-level wrappers (`score_ruler`, `kvcompress.eval.longbench.score_longbench`) take
the max over references and the mean over samples, reported x100 as both benchmarks do.

Heavy imports (torch, rouge-score, rapidfuzz) happen inside the functions that need
them, so generating tasks or loading data does not pay for them.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "RULER_METRICS",
    "classification_accuracy",
    "code_edit_similarity",
    "count_accuracy",
    "mean_kl",
    "normalize_answer",
    "qa_f1",
    "retrieval_accuracy",
    "rouge_l",
    "score_ruler",
    "string_match_all",
    "string_match_part",
    "top1_agreement",
]


# --- RULER ------------------------------------------------------------------------------


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of references found (case-insensitively) as substrings of the prediction.

    Used where the model must return every item (all values, all variables, all words):
    partial answers earn partial credit.
    """
    if not references:
        return 0.0
    pred = prediction.lower()
    return sum(ref.lower() in pred for ref in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 if any reference is found (case-insensitively) in the prediction, else 0.0.

    Used where references are alternative phrasings of one answer (RULER's QA tasks).
    """
    pred = prediction.lower()
    return float(any(ref.lower() in pred for ref in references))


# Every synthetic task here asks for a set of items, so all of them use string_match_all,
# as RULER does for its retrieval, tracing and aggregation tasks. string_match_part is
# RULER's metric for its QA tasks (alternative gold answers), kept for callers' own tasks.
RULER_METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "niah_single": string_match_all,
    "niah_multikey": string_match_all,
    "niah_multivalue": string_match_all,
    "niah_multiquery": string_match_all,
    "vt": string_match_all,
    "cwe": string_match_all,
    "fwe": string_match_all,
    "qa": string_match_part,
}


def score_ruler(task: str, predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean score of a RULER task over samples, x100."""
    if task not in RULER_METRICS:
        raise KeyError(f"unknown RULER task {task!r}; known: {sorted(RULER_METRICS)}")
    _check_same_length(predictions, answers)
    if not predictions:
        return 0.0
    metric = RULER_METRICS[task]
    total = sum(metric(pred, refs) for pred, refs in zip(predictions, answers, strict=True))
    return 100.0 * total / len(predictions)


def _check_same_length(predictions: Sequence[object], answers: Sequence[object]) -> None:
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} reference lists")


# --- LongBench ----------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lowercase, drop punctuation and articles, squash spaces.

    Punctuation goes before articles so that "the," still counts as an article.
    """
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def qa_f1(prediction: str, reference: str) -> float:
    """Token-level F1 between normalised prediction and reference (bag of words)."""
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    overlap = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if overlap == 0:
        # Also covers empty strings: an empty answer earns nothing, even against an
        # empty reference, as in LongBench.
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    # No stemming: LongBench's ROUGE-L compares surface words.
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of words), via `rouge-score`.

    rouge-score's tokenizer keeps only [a-z0-9] words, so empty or non-Latin text scores 0.
    """
    if not prediction.strip() or not reference.strip():
        return 0.0
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def classification_accuracy(prediction: str, reference: str, all_classes: Sequence[str]) -> float:
    """Credit for naming the right class, shared out among all classes the text names.

    A class is "named" if it occurs in the prediction. Classes that occur only as part of
    the reference label (e.g. "city" inside "Other city") are not counted against it.
    Naming the reference alone scores 1; naming it alongside k other classes scores
    1/(k+1), so listing every class does not pay.
    """
    named = [label for label in all_classes if label in prediction]
    named = [label for label in named if label == reference or label not in reference]
    if reference not in named:
        return 0.0
    return 1.0 / len(named)


_NUMBER = re.compile(r"\d+")


def _share_of_numbers(prediction: str, target: str) -> float:
    """Fraction of the numbers in the prediction that equal `target` (0 if none)."""
    numbers = _NUMBER.findall(prediction)
    if not numbers:
        return 0.0
    return sum(number == target for number in numbers) / len(numbers)


def retrieval_accuracy(prediction: str, reference: str) -> float:
    """Passage retrieval: the reference is "Paragraph N"; credit for answering N.

    Every number in the prediction counts as a guess, so hedging across several
    paragraphs earns only a share.
    """
    match = _NUMBER.search(reference)
    if match is None:
        raise ValueError(f"retrieval reference has no paragraph number: {reference!r}")
    return _share_of_numbers(prediction, match.group())


def count_accuracy(prediction: str, reference: str | int) -> float:
    """Passage count: share of the numbers in the prediction equal to the true count."""
    return _share_of_numbers(prediction, str(reference).strip())


def _first_code_line(prediction: str) -> str:
    """The first line that looks like code, skipping fences and comments.

    Models often open with a ``` fence or a comment before the completion proper, and
    the reference is a single line of code.
    """
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def code_edit_similarity(prediction: str, reference: str) -> float:
    """Normalised edit similarity (rapidfuzz `fuzz.ratio` / 100) of the first code line."""
    from rapidfuzz import fuzz

    return fuzz.ratio(_first_code_line(prediction), reference) / 100.0


# --- Logit fidelity ---------------------------------------------------------------------


def _as_rows(logits: torch.Tensor, name: str) -> torch.Tensor:
    """Flatten [..., vocab] to [positions, vocab], rejecting scalars and vectors."""
    if logits.dim() < 2:
        raise ValueError(f"{name} must have shape [T, vocab], got {tuple(logits.shape)}")
    return logits.reshape(-1, logits.shape[-1])


def _paired_rows(
    a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]
) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
        )
    rows_a, rows_b = _as_rows(a, names[0]), _as_rows(b, names[1])
    if rows_a.shape[0] == 0:
        raise ValueError("logits have no positions")
    return rows_a, rows_b


def top1_agreement(logits_a: torch.Tensor, logits_b: torch.Tensor) -> float:
    """Fraction of positions where both logit sets pick the same argmax token."""
    rows_a, rows_b = _paired_rows(logits_a, logits_b, ("logits_a", "logits_b"))
    return float((rows_a.argmax(dim=-1) == rows_b.argmax(dim=-1)).double().mean())


def mean_kl(logits_ref: torch.Tensor, logits_test: torch.Tensor) -> float:
    """KL(ref || test) of the next-token distributions, averaged over positions.

    Computed in float64 from log_softmax: in bf16/fp16 the per-position KL of a good
    approximation (~1e-4) is below the rounding error of the probabilities. Tokens the
    reference gives zero probability (masked logits, -inf) contribute 0, not NaN.
    """
    import torch

    rows_ref, rows_test = _paired_rows(logits_ref, logits_test, ("logits_ref", "logits_test"))
    log_p = torch.log_softmax(rows_ref.to(torch.float64), dim=-1)
    log_q = torch.log_softmax(rows_test.to(torch.float64), dim=-1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return float(terms.sum(dim=-1).mean())
