"""`kvcompress generate` through its public command."""

from __future__ import annotations

import json

import pytest

from kvcompress.entrypoints.cli.main import main

pytestmark = pytest.mark.slow


def test_generate_json_reports_the_compression_it_was_asked_for(tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The river keeps its old course through the valley. " * 40)
    argv = ["generate", "--prompt-file", str(prompt), "--max-tokens", "4", "--json"]
    argv += ["--kv-cache-memory", "64MiB", "--compression-rate", "4", "--protected-window", "8"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["finish_reason"] in {"length", "stop"} and 1 <= doc["completion_tokens"] <= 4
    kv = doc["kv"]
    assert kv["compression_rate"] > 2 and kv["compressions"] >= 1
    assert kv["physical_kvs"] == kv["blocks"] * kv["block_size"]


def test_generate_refuses_a_bad_option_with_a_clear_message(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "hi", "--protected-window", "-3"])
    assert "protected_window must be an integer >= 0" in capsys.readouterr().err
