"""The LongBench subsets this package evaluates: how each is prompted and scored."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CHINESE_SUBSETS", "SUBSETS", "SubsetSpec", "UnsupportedSubsetError", "spec_for"]


class UnsupportedSubsetError(ValueError):
    """A known LongBench subset this package deliberately does not evaluate."""


@dataclass(frozen=True)
class SubsetSpec:
    """How to prompt for and score one subset.

    Templates are `str.format` strings with ``{context}`` and ``{input}`` fields; data
    is substituted, never re-parsed, so braces in code contexts are safe.
    `first_line_only` marks the few-shot subsets, where a model tends to continue with
    the next invented example: only the first line of its output is scored.
    `chat` False marks the few-shot and code-completion subsets, which LongBench prompts
    without the chat template even for instruct models: their prompts are continuations,
    not instructions.
    """

    name: str
    metric: str
    max_new_tokens: int
    context_template: str
    question_template: str
    first_line_only: bool = False
    in_longbench_e: bool = False
    chat: bool = True


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
            chat=False,
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
            chat=False,
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
            chat=False,
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
            chat=False,
        ),
        SubsetSpec(
            "repobench-p",
            "code_edit_similarity",
            64,
            "Complete the code below.\n{context}",
            "{input}Next line of code:\n",
            in_longbench_e=True,
            chat=False,
        ),
    )
}

CHINESE_SUBSETS: frozenset[str] = frozenset(
    {"multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"}
)


def spec_for(subset: str, longbench_e: bool = False) -> SubsetSpec:
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
