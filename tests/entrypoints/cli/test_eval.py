"""``kvcompress eval`` argument handling and end-to-end output (JSON, CSV, table, plots)."""

from __future__ import annotations

import argparse
import json

import pytest

from kvcompress.compress import compression_fields
from kvcompress.entrypoints.cli.eval import add_eval_parser, default_chat, evaluate, run_eval
from kvcompress.eval import SWEPT_FIELDS
from tests.eval.shared_engine import shared_engine


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kvcompress")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["eval", *argv])


# --- Bad arguments fail fast, before any model is loaded --------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--policies", "kvcompress,nope"], "unknown policy nope"),
        (["--policies", "kvcompress:layer_floor=x"], "layer_floor takes float values, got 'x'"),
        (["--policies", "kvcompress:nope=1"], "'nope=1' is not field=value"),
        (["--policies", "kvcompress:policy=h2o"], "the sweep sets policy itself"),
        (["--policies", "full:sinks=4"], "full evicts nothing"),
        (["--tasks", "niah_single,haystack"], "unknown RULER task haystack"),
        (["--rates", "0.5,4"], "rates must be numbers >= 1"),
        (["--rates", "four"], "comma-separated numbers"),
        (["--lengths", "1024.5"], "whole numbers"),
        (["--subsets", "dureader"], "unknown LongBench subset dureader"),
        (["--suite", "mmlu"], "invalid choice"),
        (["--num-samples", "0"], "expected a number >= 1"),
        # The grid sets the policy and the budget; the other compression fields are options.
        (["--compression-rate", "4"], "unrecognized arguments"),
        (["--max-cache-tokens", "64"], "unrecognized arguments"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_all_expands_to_every_name():
    args = parse("--policies", "all", "--tasks", "all", "--rates", "1,2.5,8")
    assert args.policies[0] == "full" and len(args.policies) == 7
    assert len(args.tasks) == 7
    assert args.rates == (1, 2.5, 8)


def test_a_policy_may_be_a_variant_with_fields_of_its_own():
    args = parse("--policies", "full,kvcompress,kvcompress:layer_floor=0.75:pool_kernel=7")
    assert args.policies == ("full", "kvcompress", "kvcompress:layer_floor=0.75:pool_kernel=7")
    args = parse("--policies", "all,kvcompress:layer_floor=0.75,uniform")
    assert args.policies == (*parse("--policies", "all").policies, "kvcompress:layer_floor=0.75")
    # Values out of range are the schema's to refuse, before the model loads.
    with pytest.raises(ValueError, match="layer_floor must be a number from 0 to 1"):
        evaluate(parse("--policies", "kvcompress:layer_floor=2"))


def test_shared_prefill_is_on_unless_turned_off():
    assert parse().shared_prefill is True
    assert parse("--no-shared-prefill").shared_prefill is False


def test_compression_options_are_the_schema_fields_the_grid_does_not_set():
    args = parse("--protected-window", "16", "--sinks", "4", "--metric", "l1-sum")
    assert (args.protected_window, args.sinks, args.metric) == (16, 4, "l1-sum")
    parser = argparse.ArgumentParser(prog="kvcompress")
    eval_parser = add_eval_parser(parser.add_subparsers(dest="command", required=True))
    offered = {action.dest for action in eval_parser._actions}
    schema = {spec.name for spec in compression_fields()}
    assert schema - offered == set(SWEPT_FIELDS)


def test_bad_compression_option_fails_before_the_model_loads():
    with pytest.raises(ValueError, match="protected_window must be an integer >= 0"):
        evaluate(parse("--protected-window", "-1"))


def test_chat_template_defaults():
    assert parse().chat is None  # settled per suite once the tokenizer is known
    assert parse("--no-chat").chat is False
    assert default_chat("ruler", True) is False
    assert default_chat("longbench", True) is True
    assert default_chat("longbench", False) is False


def test_longbench_needs_a_data_dir():
    with pytest.raises(ValueError, match="needs --data-dir"):
        evaluate(parse("--suite", "longbench"))


def test_longbench_data_dir_must_exist(tmp_path):
    with pytest.raises(ValueError, match="data directory not found"):
        evaluate(parse("--suite", "longbench", "--data-dir", str(tmp_path / "absent")))


def test_longbench_data_dir_without_files(tmp_path):
    with pytest.raises(ValueError, match="no LongBench subset files"):
        evaluate(parse("--suite", "longbench", "--data-dir", str(tmp_path)))
    (tmp_path / "qasper.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"missing from .*: hotpotqa\.jsonl"):
        evaluate(
            parse("--suite", "longbench", "--data-dir", str(tmp_path), "--subsets", "hotpotqa")
        )


def test_fidelity_text_file_must_exist(tmp_path):
    with pytest.raises(ValueError, match="cannot read --text-file"):
        evaluate(parse("--suite", "fidelity", "--text-file", str(tmp_path / "none.txt")))


# --- End to end on the default model (tiny) ----------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    return shared_engine()


@pytest.mark.slow
def test_fidelity_json_csv_and_plots(engine, tmp_path, capsys):
    args = parse(
        "--suite", "fidelity", "--prefix-len", "256", "--continuation-len", "8",
        "--num-windows", "1", "--policies", "full,streaming", "--rates", "1,8",
        "--json", "--csv", str(tmp_path / "rows.csv"), "--plot-dir", str(tmp_path / "plots"),
        "--no-progress",
    )  # fmt: skip
    assert run_eval(args, engine) == 0
    out = capsys.readouterr()
    document = json.loads(out.out)  # stdout holds the JSON document and nothing else
    assert document["suite"] == "fidelity"
    rows = document["rows"]
    assert [(r["policy"], r["rate"]) for r in rows] == [
        ("full", 1), ("full", 8), ("streaming", 1), ("streaming", 8)
    ]  # fmt: skip
    assert {"agreement", "kl", "achieved_rate", "num_samples"} <= rows[-1].keys()
    assert "score" not in rows[-1]
    assert document["kept_per_layer_head"]["rate"] == 8
    swept = set(SWEPT_FIELDS)
    defaults = {s.name: s.default for s in compression_fields() if s.name not in swept}
    # Sweeps label their rates truly: no floor under a rate's budget.
    assert document["config"]["compression"] == defaults | {"min_cache_tokens": 0}
    csv_lines = (tmp_path / "rows.csv").read_text().splitlines()
    assert csv_lines[0].split(",")[-3:] == ["agreement", "kl", "num_samples"]
    assert len(csv_lines) == 5
    for name in ("fidelity_scores.png", "fidelity_kept_kvs.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000
    assert "wrote" in out.err


@pytest.mark.slow
def test_ruler_table_with_context_compressed_first(engine, capsys):
    args = parse(
        "--tasks", "niah_single", "--lengths", "256", "--num-samples", "1",
        "--policies", "full,kvcompress", "--rates", "1,4", "--compress-context-only",
        "--chat", "--protected-window", "16", "--no-progress",
    )  # fmt: skip
    assert run_eval(args, engine) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "context compressed before the question" in lines[0]
    assert "protected window 16" in lines[0]
    assert "chat template on, one shared prefill per prompt" in lines[0]
    assert lines[1].split() == [
        "suite", "task", "length", "policy", "rate", "achieved_rate", "score", "num_samples"
    ]  # fmt: skip
    assert len(lines) == 2 + 4


@pytest.mark.slow
def test_longbench_subset_from_local_file(engine, tmp_path, capsys):
    example = {
        "input": "Which city is the capital of the country where the Loire flows?",
        "context": "Passage 1: The Loire is the longest river in France. " * 20
        + "Passage 2: Paris is the capital of France.",
        "answers": ["Paris"],
        "length": 300,
        "dataset": "hotpotqa",
        "language": "en",
        "all_classes": None,
        "_id": "x1",
    }
    (tmp_path / "hotpotqa.jsonl").write_text(json.dumps(example) + "\n")
    args = parse(
        "--suite", "longbench", "--data-dir", str(tmp_path), "--lengths", "256",
        "--policies", "full,kvcompress", "--rates", "1,4", "--json", "--no-progress",
    )  # fmt: skip
    assert run_eval(args, engine) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["config"]["chat"] is True  # LongBench's default for instruct models
    rows = document["rows"]
    assert [(r["task"], r["policy"], r["rate"]) for r in rows] == [
        ("hotpotqa", p, r) for p in ("full", "kvcompress") for r in (1, 4)
    ]
    assert all(0 <= r["score"] <= 100 and r["length"] == 256 for r in rows)
    assert rows[-1]["achieved_rate"] > 1.5
