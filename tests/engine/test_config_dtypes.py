"""EngineConfig's dtype, KV cache dtype, attention backend and weight packing options."""

from __future__ import annotations

import argparse

import pytest
import torch

from kvcompress.cache import FP8
from kvcompress.engine import EngineConfig
from kvcompress.entrypoints.cli.args import add_engine_args, engine_config_from_args
from kvcompress.models import packing_available


def test_auto_dtypes_follow_the_device() -> None:
    cpu = EngineConfig()
    assert (cpu.dtype, cpu.kv_cache_dtype, cpu.attention_backend) == (
        torch.float32,
        torch.float32,
        "auto",
    )
    cuda = EngineConfig(device="cuda")  # resolved from the name alone: no GPU needed
    assert (cuda.dtype, cuda.kv_cache_dtype) == (torch.bfloat16, torch.bfloat16)
    fp8 = EngineConfig(device="cuda", dtype="float16", kv_cache_dtype="fp8")
    assert (fp8.dtype, fp8.kv_cache_dtype) == (torch.float16, FP8)
    assert EngineConfig(dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dtype": "float64"},
        {"kv_cache_dtype": "int4"},
        {"attention_backend": "flash"},
        {"packed_weights": "yes"},
        {"packed_weights": "on", "dtype": "bfloat16"},
        {"packed_weights": "on", "device": "cuda"},
    ],
)
def test_bad_names_are_refused(kwargs) -> None:
    with pytest.raises(ValueError):
        EngineConfig(**kwargs)


def test_weights_are_packed_for_float32_on_cpu_only() -> None:
    assert EngineConfig().packs_weights == packing_available()
    assert not EngineConfig(packed_weights="off").packs_weights
    assert not EngineConfig(dtype="bfloat16").packs_weights
    assert not EngineConfig(device="cuda").packs_weights


def test_cli_options_reach_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--dtype", "bfloat16", "--kv-cache-dtype", "fp8"])
    config = engine_config_from_args(args, compression=EngineConfig().compression)
    assert (config.dtype, config.kv_cache_dtype) == (torch.bfloat16, FP8)
    args = parser.parse_args(["--packed-weights", "off"])
    assert engine_config_from_args(args).packed_weights == "off"
    with pytest.raises(SystemExit):
        parser.parse_args(["--attention-backend", "cuda"])
