import json

import pytest

from kvcompress.eval.longbench import (
    METRICS,
    SUBSETS,
    LongBenchExample,
    UnsupportedSubsetError,
    available_subsets,
    format_prompt,
    load_longbench,
    score_longbench,
    score_longbench_e,
    truncate_middle,
)


def _row(i: int, **overrides) -> dict:
    row = {
        "input": f"Who wrote book {i}?",
        "context": f"Passage {i}: book {i} was written by Author {i}.",
        "answers": [f"Author {i}"],
        "length": 1000 * (i + 1) * 3,
        "dataset": "hotpotqa",
        "language": "en",
        "all_classes": None,
        "_id": f"id{i}",
    }
    row.update(overrides)
    return row


def _write(path, rows, blank_lines=False):
    lines = [json.dumps(r) for r in rows]
    sep = "\n\n" if blank_lines else "\n"
    path.write_text(sep.join(lines) + "\n", encoding="utf-8")


def test_load_jsonl(tmp_path):
    _write(tmp_path / "hotpotqa.jsonl", [_row(i) for i in range(3)], blank_lines=True)
    examples = load_longbench(tmp_path, "hotpotqa")
    assert len(examples) == 3
    first = examples[0]
    assert isinstance(first, LongBenchExample)
    assert first.answers == ["Author 0"] and first.id == "id0" and first.length == 3000
    assert first.all_classes == []  # null in the file
    assert load_longbench(str(tmp_path), "hotpotqa", limit=2) == examples[:2]
    assert available_subsets(tmp_path) == ["hotpotqa"]


def test_load_longbench_e(tmp_path):
    _write(tmp_path / "trec_e.jsonl", [_row(0, dataset="trec", all_classes=["a", "b"])])
    (example,) = load_longbench(tmp_path, "trec", longbench_e=True)
    assert example.all_classes == ["a", "b"]
    assert available_subsets(tmp_path, longbench_e=True) == ["trec"]
    assert available_subsets(tmp_path) == []
    with pytest.raises(KeyError, match="LongBench-E"):
        load_longbench(tmp_path, "musique", longbench_e=True)


def test_missing_dir_and_file(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere") as err:
        load_longbench(missing, "hotpotqa")
    assert "hotpotqa.jsonl" in str(err.value)
    with pytest.raises(FileNotFoundError):
        available_subsets(missing)
    _write(tmp_path / "qasper.jsonl", [_row(0)])
    with pytest.raises(FileNotFoundError, match=r"narrativeqa\.jsonl") as err:
        load_longbench(tmp_path, "narrativeqa")
    assert "qasper.jsonl" in str(err.value)  # lists what is there


def test_unsupported_unknown_and_malformed(tmp_path):
    with pytest.raises(UnsupportedSubsetError, match="Chinese"):
        load_longbench(tmp_path, "dureader")
    with pytest.raises(KeyError, match="unknown"):
        load_longbench(tmp_path, "not_a_subset")
    (tmp_path / "musique.jsonl").write_text(json.dumps(_row(0)) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"musique.jsonl:2"):
        load_longbench(tmp_path, "musique")
    (tmp_path / "musique.jsonl").write_text(json.dumps({"input": "x"}) + "\n")
    with pytest.raises(ValueError, match="missing field"):
        load_longbench(tmp_path, "musique")


def test_every_subset_is_complete():
    example = LongBenchExample("the input", "the context", ["x"], 1, "d", "en", [], "i")
    for name, spec in SUBSETS.items():
        assert spec.metric in METRICS
        assert spec.max_new_tokens > 0
        prompt = format_prompt(name, example)
        assert prompt.text == prompt.context + prompt.question
        assert "the context" in prompt.context
        if "{input}" in spec.question_template:
            assert "the input" in prompt.question


def test_format_prompt_keeps_braces():
    code = "def f():\n    return {'a': {x}}\n"
    example = LongBenchExample("", code, ["x"], 1, "lcc", "en", [], "i")
    prompt = format_prompt("lcc", example)
    assert code in prompt.context and prompt.question.endswith("Next line of code:\n")


def test_score_longbench():
    # qa_f1, max over references, x100
    preds = ["Author 0", "It was Author One", "nobody"]
    refs = [["Author 0"], ["Author One", "A. One"], ["Author 2"]]
    expected = 100 * (1.0 + 2 * (2 / 4) * 1 / (2 / 4 + 1) + 0.0) / 3
    assert score_longbench("hotpotqa", preds, refs) == pytest.approx(expected)
    # few-shot subsets score only the first line
    classes = ["Date", "Number", "Location"]
    trec_preds = ["\nDate\nQuestion: ...\nType: Number", "Number"]
    assert score_longbench("trec", trec_preds, [["Date"], ["Date"]], classes) == 50.0
    assert score_longbench("passage_retrieval_en", ["Paragraph 4"], [["Paragraph 4"]]) == 100.0
    assert score_longbench("hotpotqa", [], []) == 0.0
    with pytest.raises(ValueError):
        score_longbench("hotpotqa", ["a"], [])
    with pytest.raises(UnsupportedSubsetError):
        score_longbench("lsht", ["a"], [["a"]])


def test_score_longbench_e_buckets():
    preds = ["x", "x", "y"]
    refs = [["x"], ["y"], ["y"]]
    scores = score_longbench_e("triviaqa", preds, refs, [100, 5000, 9000])
    assert scores == {"0-4k": 100.0, "4-8k": 0.0, "8k+": 100.0}
    assert score_longbench_e("triviaqa", ["x"], [["x"]], [10]) == {"0-4k": 100.0}


def test_truncate_middle(bpe_tokenizer):
    text = "BEGIN " + "filler words here " * 200 + "END"
    out = truncate_middle(text, bpe_tokenizer, 40)
    assert out.startswith("BEGIN") and out.endswith("END")
    assert len(bpe_tokenizer.encode(out, add_special_tokens=False).ids) <= 42
    assert truncate_middle("short text", bpe_tokenizer, 40) == "short text"
