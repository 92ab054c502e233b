import math

import pytest
import torch

from kvcompress.eval.scoring import (
    classification_accuracy,
    code_edit_similarity,
    count_accuracy,
    mean_kl,
    normalize_answer,
    qa_f1,
    retrieval_accuracy,
    rouge_l,
    score_ruler,
    string_match_all,
    string_match_part,
    top1_agreement,
)


def test_string_match_all_and_part():
    pred = "The numbers are 123 and 456."
    assert string_match_all(pred, ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert string_match_all("Answer: KXQPA, mnbvc", ["kxqpa", "MNBVC"]) == 1.0
    assert string_match_all(pred, []) == 0.0
    assert string_match_part(pred, ["789", "456"]) == 1.0
    assert string_match_part(pred, ["789"]) == 0.0


def test_score_ruler():
    preds = ["12345", "nothing", "11111 and 22222"]
    refs = [["12345"], ["99999"], ["11111", "22222", "33333"]]
    assert score_ruler("niah_multivalue", preds, refs) == pytest.approx(100 * (1 + 0 + 2 / 3) / 3)
    with pytest.raises(ValueError):
        score_ruler("vt", preds, refs[:2])
    with pytest.raises(KeyError):
        score_ruler("nope", preds, refs)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Cat, sat on a  mat!", "cat sat on mat"),
        ("An apple.", "apple"),
        ("theatre another", "theatre another"),  # articles only as whole words
        ("the, cat", "cat"),  # punctuation goes first, so "the," is an article
        ("  ", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_qa_f1():
    assert qa_f1("The Eiffel Tower.", "eiffel tower") == 1.0
    # precision 1/2, recall 1: F1 = 2/3
    assert qa_f1("Barack Obama", "Obama") == pytest.approx(2 / 3)
    assert qa_f1("obama obama", "obama") == pytest.approx(2 / 3)  # bag of words, with counts
    assert qa_f1("Paris", "London") == 0.0
    assert qa_f1("", "London") == 0.0
    assert qa_f1("the", "a") == 0.0  # both normalise to nothing


def test_rouge_l():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    # LCS "the cat on the mat" = 5 words: P = 5/5, R = 5/6, F = 10/11.
    assert rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(10 / 11)
    assert rouge_l("", "something") == 0.0
    assert rouge_l("dog", "cat") == 0.0


def test_classification_accuracy():
    classes = ["location", "other location", "number"]
    # "location" is part of the reference label, so it does not count as a second guess.
    assert classification_accuracy("other location", "other location", classes) == 1.0
    assert classification_accuracy("location or number", "location", classes) == 0.5
    assert classification_accuracy("number", "location", classes) == 0.0
    assert classification_accuracy("", "location", classes) == 0.0


def test_retrieval_and_count():
    assert retrieval_accuracy("Paragraph 12", "Paragraph 12") == 1.0
    assert retrieval_accuracy("Paragraph 12, or maybe paragraph 3", "Paragraph 12") == 0.5
    assert retrieval_accuracy("I don't know", "Paragraph 12") == 0.0
    assert retrieval_accuracy("Paragraph 1", "Paragraph 12") == 0.0
    assert count_accuracy("There are 7 distinct paragraphs.", 7) == 1.0
    assert count_accuracy("7 or 8", "7") == 0.5
    assert count_accuracy("seven", "7") == 0.0


def test_code_edit_similarity():
    ref = "    return x + 1"
    assert code_edit_similarity("```python\n# add one\n    return x + 1\n```", ref) == 1.0
    assert code_edit_similarity("\n\n    return x + 1\nprint(x)", ref) == 1.0
    assert 0.0 < code_edit_similarity("    return x + 2", ref) < 1.0
    assert code_edit_similarity("", ref) == 0.0


def test_fidelity_identical_logits():
    torch.manual_seed(0)
    logits = torch.randn(16, 50)
    assert top1_agreement(logits, logits.clone()) == 1.0
    assert mean_kl(logits, logits.clone()) == pytest.approx(0.0, abs=1e-12)
    assert mean_kl(logits.bfloat16(), logits.bfloat16()) == pytest.approx(0.0, abs=1e-12)


def test_fidelity_different_logits():
    torch.manual_seed(0)
    a, b = torch.randn(16, 50), torch.randn(16, 50)
    assert mean_kl(a, b) > 0.0
    assert top1_agreement(a, b) < 1.0
    # Two classes: p = (1/2, 1/2), q = (3/4, 1/4) -> KL = 0.5 * ln(4/3).
    ref = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    test = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    assert mean_kl(ref, test) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-12)


def test_top1_agreement_partial_and_batched():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [2.0, 0.0]])
    assert top1_agreement(a, b) == 0.5
    assert top1_agreement(a.view(2, 2, 2), b.view(2, 2, 2)) == 0.5


def test_mean_kl_masked_vocab_and_errors():
    ref = torch.tensor([[0.0, 1.0, float("-inf")]])
    test = torch.tensor([[0.5, 1.0, float("-inf")]])
    assert math.isfinite(mean_kl(ref, test)) and mean_kl(ref, test) > 0
    with pytest.raises(ValueError, match="shapes differ"):
        mean_kl(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError):
        top1_agreement(torch.zeros(4), torch.zeros(4))
