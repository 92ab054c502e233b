"""Command-line options derived from the configs they fill."""

from __future__ import annotations

import argparse

import pytest

from kvcompress.compress import CompressionParams, compression_fields
from kvcompress.engine import EngineConfig
from kvcompress.entrypoints.cli.args import (
    add_compression_args,
    add_engine_args,
    compression_from_args,
    engine_config_from_args,
)
from kvcompress.entrypoints.cli.main import build_parser


def parser(**kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(exit_on_error=False)
    add_engine_args(p)
    add_compression_args(p, **kw)
    return p


def test_every_compression_field_is_an_option_with_its_schema_default():
    text = parser().format_help()
    for spec in compression_fields():
        flag = "--" + spec.name.replace("_", "-")
        assert flag in text
        assert spec.help.split()[0] in text
    assert "(default: 32)" in text  # protected_window, from the schema


def test_options_not_given_leave_the_base_alone_and_given_ones_override():
    args = parser().parse_args(["--protected-window", "64", "--compress-once"])
    base = CompressionParams(sinks=4, compression_interval=8)
    params = compression_from_args(args, base)
    assert params.protected_window == 64 and params.compress_once
    assert params.sinks == 4 and params.compression_interval == 8
    assert compression_from_args(parser().parse_args([])) == CompressionParams()


def test_none_clears_a_nullable_default_and_budgets_exclude_each_other():
    args = parser().parse_args(["--compression-interval", "none"])
    assert compression_from_args(args, CompressionParams(compression_interval=8)) == (
        CompressionParams()
    )
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        parser().parse_args(["--compression-rate", "4", "--max-cache-tokens", "64"])


def test_bad_values_name_the_option():
    with pytest.raises(ValueError, match="protected_window"):
        compression_from_args(parser().parse_args(["--protected-window", "-1"]))


def test_engine_options_default_to_engine_config():
    config = engine_config_from_args(parser().parse_args([]))
    defaults = EngineConfig()
    for field in ("kv_cache_memory", "block_size", "max_num_seqs", "max_num_batched_tokens"):
        assert getattr(config, field) == getattr(defaults, field)
    assert config.compression == CompressionParams()


def test_excluded_fields_are_not_offered():
    p = parser(exclude=("compression_rate", "max_cache_tokens"))
    assert "--compression-rate" not in p.format_help()
    assert "--policy" in p.format_help()


@pytest.mark.parametrize(
    "command", ["generate", "serve", "bench memory", "bench decode", "bench throughput"]
)
def test_commands_offer_the_schema(command):
    sub = build_parser()
    args = sub.parse_args(
        [*command.split(), "--sinks", "2"] + (["x"] if command == "generate" else [])
    )
    assert compression_from_args(args).sinks == 2


@pytest.mark.parametrize("command", ["generate", "serve", "eval", "inspect", "bench memory"])
def test_metric_settings_are_compression_options_of_every_command(command):
    """--pool-kernel, --window-size, --collection-buffer: one option each, from the schema,
    setting the defaults of every request (none: the engine's MetricConfig)."""
    positional = {"generate": ["x"], "inspect": ["x"]}.get(command, [])
    given = ["--pool-kernel", "21", "--window-size", "8", "--collection-buffer", "2"]
    args = build_parser().parse_args([*command.split(), *given, *positional])
    params = compression_from_args(args)
    assert (params.pool_kernel, params.window_size, params.collection_buffer) == (21, 8, 2)
    unset = compression_from_args(build_parser().parse_args([*command.split(), *positional]))
    assert unset.pool_kernel is None  # the engine's MetricConfig decides
    with pytest.raises(ValueError, match="pool_kernel"):
        compression_from_args(parser().parse_args(["--pool-kernel", "20"]))


def test_bench_defaults_come_from_their_configs():
    from kvcompress.bench.memory import MemoryBenchConfig

    args = build_parser().parse_args(["bench", "memory"])
    defaults = MemoryBenchConfig()
    assert (args.prompt_len, args.rates) == (defaults.prompt_len, defaults.rates)
