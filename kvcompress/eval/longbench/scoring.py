"""LongBench scores: each subset's metric, max over references, mean over samples."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from kvcompress.eval.longbench.subsets import SubsetSpec, spec_for
from kvcompress.eval.scoring import (
    classification_accuracy,
    code_edit_similarity,
    count_accuracy,
    qa_f1,
    retrieval_accuracy,
    rouge_l,
)

__all__ = ["LENGTH_BUCKETS", "METRICS", "score_longbench", "score_longbench_e"]

# One signature for all: (prediction, reference, all_classes) -> score in [0, 1].
Metric = Callable[[str, str, Sequence[str]], float]


def _qa_f1(prediction: str, reference: str, _classes: Sequence[str]) -> float:
    return qa_f1(prediction, reference)


def _rouge_l(prediction: str, reference: str, _classes: Sequence[str]) -> float:
    return rouge_l(prediction, reference)


def _classification(prediction: str, reference: str, classes: Sequence[str]) -> float:
    return classification_accuracy(prediction, reference, classes)


def _retrieval(prediction: str, reference: str, _classes: Sequence[str]) -> float:
    return retrieval_accuracy(prediction, reference)


def _count(prediction: str, reference: str, _classes: Sequence[str]) -> float:
    return count_accuracy(prediction, reference)


def _code(prediction: str, reference: str, _classes: Sequence[str]) -> float:
    return code_edit_similarity(prediction, reference)


METRICS: dict[str, Metric] = {
    "qa_f1": _qa_f1,
    "rouge_l": _rouge_l,
    "classification_accuracy": _classification,
    "retrieval_accuracy": _retrieval,
    "count_accuracy": _count,
    "code_edit_similarity": _code,
}


def _sample_score(
    spec: SubsetSpec, prediction: str, references: Sequence[str], classes: Sequence[str]
) -> float:
    if spec.first_line_only:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = METRICS[spec.metric]
    return max((metric(prediction, ref, classes) for ref in references), default=0.0)


def score_longbench(
    subset: str,
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    all_classes: Sequence[str] | None = None,
) -> float:
    """Subset score as LongBench reports it: max over references, mean over samples, x100.

    `all_classes` is the subset's label set (one list for the whole subset, as in the
    data files); it is only used by classification subsets.
    """
    spec = spec_for(subset)
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if not predictions:
        return 0.0
    classes = list(all_classes or [])
    total = sum(
        _sample_score(spec, pred, refs, classes)
        for pred, refs in zip(predictions, answers, strict=True)
    )
    return 100.0 * total / len(predictions)


# LongBench-E reports each subset separately for short, medium and long inputs, with
# lengths in words as given by the `length` field.
LENGTH_BUCKETS: tuple[tuple[str, int, float], ...] = (
    ("0-4k", 0, 4000),
    ("4-8k", 4000, 8000),
    ("8k+", 8000, math.inf),
)


def score_longbench_e(
    subset: str,
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    lengths: Sequence[int],
    all_classes: Sequence[str] | None = None,
) -> dict[str, float]:
    """LongBench-E scores per length bucket (x100); buckets with no samples are omitted."""
    if not len(predictions) == len(answers) == len(lengths):
        raise ValueError("predictions, answers and lengths must have the same length")
    scores: dict[str, float] = {}
    for name, low, high in LENGTH_BUCKETS:
        picked = [i for i, length in enumerate(lengths) if low <= length < high]
        if picked:
            scores[name] = score_longbench(
                subset,
                [predictions[i] for i in picked],
                [answers[i] for i in picked],
                all_classes,
            )
    return scores
