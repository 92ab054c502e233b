"""Rows of a result: their columns, and how they print as a table and a CSV file."""

from __future__ import annotations

from kvcompress.eval.results import Row, format_cell
from kvcompress.report import format_table, write_csv


def sample_rows() -> list[Row]:
    return [
        Row("ruler", task, 512, policy, rate, 1.0 if policy == "full" else rate * 0.9, 2, score)
        for task in ("niah_single", "vt")
        for policy, rate, score in [
            ("full", 1, 100.0),
            ("full", 8, 100.0),
            ("random", 1, 100.0),
            ("random", 8, 25.0),
        ]
    ]


def test_table_and_csv(tmp_path):
    rows = sample_rows()
    dicts = [row.as_dict() for row in rows]
    table = format_table(dicts, format_cell).splitlines()
    assert table[0].split() == [
        "suite",
        "task",
        "length",
        "policy",
        "rate",
        "achieved_rate",
        "score",
        "num_samples",
    ]
    assert len(table) == len(rows) + 1
    path = write_csv(dicts, tmp_path / "out" / "rows.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == "suite,task,length,policy,rate,achieved_rate,score,num_samples"
    assert len(lines) == len(rows) + 1
    fidelity = Row("fidelity", "pydoc", 512, "random", 8, 6.5, 1, agreement=0.5, kl=0.25)
    assert list(fidelity.as_dict())[-3:] == ["agreement", "kl", "num_samples"]


def test_cells_keep_the_table_narrow():
    assert [format_cell(k, 0.123456) for k in ("kl", "agreement", "achieved_rate", "score")] == [
        "0.1235",
        "0.123",
        "0.12",
        "0.1",
    ]
    assert (format_cell("rate", 16.0), format_cell("policy", "h2o")) == ("16", "h2o")
