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
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from kvcompress.eval.scoring import (
    classification_accuracy,
    code_edit_similarity,
    count_accuracy,
    qa_f1,
    retrieval_accuracy,
    rouge_l,
)
from kvcompress.eval.texts import TokenizerLike, encode_ids

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
    "format_prompt",
    "load_longbench",
    "score_longbench",
    "score_longbench_e",
    "truncate_middle",
]


class UnsupportedSubsetError(ValueError):
    """A known LongBench subset this package deliberately does not evaluate."""


@dataclass(frozen=True)
class LongBenchExample:
    """One line of a LongBench JSONL file (`_id` is renamed `id`)."""

    input: str
    context: str
    answers: list[str] = field(hash=False)
    length: int
    dataset: str
    language: str
    all_classes: list[str] = field(hash=False)
    id: str


class LongBenchPrompt(NamedTuple):
    """A prompt in two parts; the long `context` comes first, the `question` last."""

    context: str
    question: str

    @property
    def text(self) -> str:
        return self.context + self.question


# --- Metrics ----------------------------------------------------------------------------

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


# --- Subsets ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SubsetSpec:
    """How to prompt for and score one subset.

    Templates are `str.format` strings with ``{context}`` and ``{input}`` fields; data
    is substituted, never re-parsed, so braces in code contexts are safe.
    `first_line_only` marks the few-shot subsets, where a model tends to continue with
    the next invented example: only the first line of its output is scored.
    """

    name: str
    metric: str
    max_new_tokens: int
    context_template: str
    question_template: str
    first_line_only: bool = False
    in_longbench_e: bool = False


_SHORT_QA_CONTEXT = (
    "Answer a question using the passages below. Reply with the answer only.\n\n"
    "Passages:\n{context}\n\n"
)
_SHORT_QA_QUESTION = (
    "Using the passages above, reply with the answer only, without any other words.\n\n"
    "Question: {input}\nAnswer:"
)


SUBSETS: dict[str, SubsetSpec] = {
    spec.name: spec
    for spec in (
        SubsetSpec(
            "narrativeqa",
            "qa_f1",
            128,
            "Below is a story. Read it; you will then answer a question about it as "
            "briefly as possible.\n\nStory:\n{context}\n\n",
            "Answer the question about the story above as briefly as possible, with a "
            "phrase or a short sentence and no explanation.\n\nQuestion: {input}\n\nAnswer:",
        ),
        SubsetSpec(
            "qasper",
            "qa_f1",
            128,
            "Below is a scientific paper. Read it; you will then answer a question about "
            "it.\n\nPaper:\n{context}\n\n",
            "Answer the question about the paper above with one phrase or sentence if you "
            'can. If the paper does not tell, write "unanswerable". Answer yes/no '
            'questions with "yes", "no" or "unanswerable". Do not explain.\n\n'
            "Question: {input}\n\nAnswer:",
            in_longbench_e=True,
        ),
        SubsetSpec(
            "multifieldqa_en",
            "qa_f1",
            64,
            "Read the text below; you will then answer a short question about it.\n\n{context}\n\n",
            "Using the text above, answer the question with the answer only, without any "
            "other words.\n\nQuestion: {input}\nAnswer:",
            in_longbench_e=True,
        ),
        SubsetSpec(
            "hotpotqa", "qa_f1", 32, _SHORT_QA_CONTEXT, _SHORT_QA_QUESTION, in_longbench_e=True
        ),
        SubsetSpec(
            "2wikimqa", "qa_f1", 32, _SHORT_QA_CONTEXT, _SHORT_QA_QUESTION, in_longbench_e=True
        ),
        SubsetSpec("musique", "qa_f1", 32, _SHORT_QA_CONTEXT, _SHORT_QA_QUESTION),
        SubsetSpec(
            "gov_report",
            "rouge_l",
            512,
            "Below is a report by a government agency.\n\nReport:\n{context}\n\n",
            "Write a one-page summary of the report above.\n\nSummary:",
            in_longbench_e=True,
        ),
        SubsetSpec(
            "qmsum",
            "rouge_l",
            512,
            "Below is the transcript of a meeting; you will then answer a query about "
            "it.\n\nTranscript:\n{context}\n\n",
            "Answer the query about the transcript above in one or more sentences.\n\n"
            "Query: {input}\nAnswer:",
        ),
        SubsetSpec(
            "multi_news",
            "rouge_l",
            512,
            "Below are several news articles about one story.\n\nNews:\n{context}\n\n",
            "Write a one-page summary of all the news articles above.\n\nSummary:",
            in_longbench_e=True,
        ),
        SubsetSpec(
            "trec",
            "classification_accuracy",
            64,
            "Decide the type of the last question below. Labelled example questions come "
            "first.\n\n{context}",
            "\n{input}",
            first_line_only=True,
            in_longbench_e=True,
        ),
        SubsetSpec(
            "triviaqa",
            "qa_f1",
            32,
            "Answer the last question from its passage, giving the answer only. Worked "
            "examples come first.\n\n{context}\n\n",
            "{input}",
            first_line_only=True,
            in_longbench_e=True,
        ),
        SubsetSpec(
            "samsum",
            "rouge_l",
            128,
            "Summarize the last dialogue in a few short sentences. Worked examples come "
            "first.\n\n{context}\n\n",
            "{input}",
            first_line_only=True,
            in_longbench_e=True,
        ),
        SubsetSpec(
            "passage_count",
            "count_accuracy",
            32,
            "Below are several paragraphs; some are duplicates of others. You will be "
            "asked how many different paragraphs there are.\n\n{context}\n\n",
            "Count the different paragraphs in the text above, counting duplicates once. "
            "Reply with the number only, such as 1, 2, 3 and so on.\n\n"
            "The number of different paragraphs is:",
            in_longbench_e=True,
        ),
        SubsetSpec(
            "passage_retrieval_en",
            "retrieval_accuracy",
            32,
            "Below are numbered paragraphs, then a summary of one of them. You will be "
            "asked which paragraph the summary describes.\n\n{context}\n\n",
            "Summary: {input}\n\nWhich paragraph above does the summary describe? Reply in "
            'the form "Paragraph 1", "Paragraph 2" and so on.\n\nThe answer is: ',
            in_longbench_e=True,
        ),
        SubsetSpec(
            "lcc",
            "code_edit_similarity",
            64,
            "Complete the code below.\n{context}",
            "Next line of code:\n",
            in_longbench_e=True,
        ),
        SubsetSpec(
            "repobench-p",
            "code_edit_similarity",
            64,
            "Complete the code below.\n{context}",
            "{input}Next line of code:\n",
            in_longbench_e=True,
        ),
    )
}

CHINESE_SUBSETS: frozenset[str] = frozenset(
    {"multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"}
)


def _spec_for(subset: str, longbench_e: bool = False) -> SubsetSpec:
    if subset in CHINESE_SUBSETS:
        raise UnsupportedSubsetError(
            f"LongBench subset {subset!r} is Chinese; scoring it needs jieba word "
            "segmentation, which kvcompress does not depend on, so it is skipped. "
            f"Supported subsets: {', '.join(SUBSETS)}"
        )
    if subset not in SUBSETS:
        raise KeyError(f"unknown LongBench subset {subset!r}; known: {', '.join(SUBSETS)}")
    spec = SUBSETS[subset]
    if longbench_e and not spec.in_longbench_e:
        raise KeyError(f"LongBench-E has no subset {subset!r}")
    return spec


# --- Loading ----------------------------------------------------------------------------


def _subset_file(data_dir: Path, subset: str, longbench_e: bool) -> Path:
    return data_dir / (f"{subset}_e.jsonl" if longbench_e else f"{subset}.jsonl")


def _check_dir(data_dir: str | Path) -> Path:
    path = Path(data_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"LongBench data directory not found: {path}. Expected a folder with one JSONL "
            f"file per subset, e.g. {path / 'hotpotqa.jsonl'} (or hotpotqa_e.jsonl for "
            "LongBench-E)."
        )
    return path


def _parse_line(line: str, subset: str, where: str) -> LongBenchExample:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: invalid JSON ({err.msg})") from err
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [key for key in ("input", "context", "answers") if key not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    answers = row["answers"]
    if isinstance(answers, str):
        answers = [answers]
    return LongBenchExample(
        input=str(row["input"] or ""),
        context=str(row["context"] or ""),
        answers=[str(answer) for answer in answers],
        length=int(row.get("length") or 0),
        dataset=str(row.get("dataset") or subset),
        language=str(row.get("language") or "en"),
        # LongBench stores null for subsets that are not classification tasks.
        all_classes=[str(label) for label in row.get("all_classes") or []],
        id=str(row.get("_id", "")),
    )


def load_longbench(
    data_dir: str | Path,
    subset: str,
    *,
    longbench_e: bool = False,
    limit: int | None = None,
) -> list[LongBenchExample]:
    """Read `<data_dir>/<subset>.jsonl` (or `<subset>_e.jsonl`), in file order.

    Blank lines are skipped; `limit` keeps the first N examples.
    """
    _spec_for(subset, longbench_e)
    path = _subset_file(_check_dir(data_dir), subset, longbench_e)
    if not path.is_file():
        present = sorted(p.name for p in path.parent.glob("*.jsonl"))
        raise FileNotFoundError(
            f"LongBench subset file not found: expected {path}. "
            f"JSONL files present in {path.parent}: {present or 'none'}"
        )
    examples: list[LongBenchExample] = []
    with path.open(encoding="utf-8") as lines:
        for lineno, line in enumerate(lines, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if line.strip():
                examples.append(_parse_line(line, subset, f"{path}:{lineno}"))
    return examples


def available_subsets(data_dir: str | Path, *, longbench_e: bool = False) -> list[str]:
    """Supported subsets whose file exists in `data_dir`, in `SUBSETS` order."""
    path = _check_dir(data_dir)
    return [
        name
        for name, spec in SUBSETS.items()
        if (spec.in_longbench_e or not longbench_e)
        and _subset_file(path, name, longbench_e).is_file()
    ]


# --- Prompts ----------------------------------------------------------------------------


def format_prompt(subset: str, example: LongBenchExample) -> LongBenchPrompt:
    """The subset's prompt for `example`, as (context part, question part)."""
    spec = _spec_for(subset)
    return LongBenchPrompt(
        spec.context_template.format(context=example.context, input=example.input),
        spec.question_template.format(context=example.context, input=example.input),
    )


def truncate_middle(text: str, tokenizer: TokenizerLike, max_tokens: int) -> str:
    """Cut tokens from the middle of `text` so that it has at most `max_tokens` tokens.

    LongBench's convention for prompts longer than the model's window: instructions sit
    at both ends, so the middle of the context is the part to lose. Decoding may shift
    the count by a token or two at the seam; leave that much slack in `max_tokens`.
    """
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    ids = encode_ids(tokenizer, text)
    if len(ids) <= max_tokens:
        return text
    half = max_tokens // 2
    decode = tokenizer.decode  # type: ignore[attr-defined]
    head = decode(ids[:half], skip_special_tokens=True)
    tail = decode(ids[len(ids) - (max_tokens - half) :], skip_special_tokens=True)
    return head + tail


# --- Scoring ----------------------------------------------------------------------------


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
    spec = _spec_for(subset)
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
