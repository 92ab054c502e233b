"""Command-line options shared by the subcommands, derived from the configs they fill.

Compression options come from :func:`~kvcompress.compress.compression_fields` and engine
options from :class:`~kvcompress.engine.EngineConfig`'s fields, so their names, types and
defaults are written once, in those classes.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING, Any

from kvcompress.compress import BUDGET_FIELDS, CompressionParams, ParamField, compression_fields

if TYPE_CHECKING:
    from kvcompress.engine import EngineConfig

# EngineConfig fields offered on the command line, with their help.
ENGINE_OPTIONS: dict[str, str] = {
    "model": "HF model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
    "kv_cache_memory": "KV cache budget, e.g. 2GiB",
    "block_size": "KVs per block (a power of two, 1-128)",
    "max_num_seqs": "sequences running at once",
    "max_model_len": "context length (default: the model's own)",
    "max_num_batched_tokens": "tokens one step feeds, decodes and prompt chunks together",
    "prefill_chunk_size": "prompt tokens per prefill chunk (default: 512 on CPU, 2048 on GPUs)",
    "prefill_compression": "when an evicting prompt is compressed: when-needed (once its "
    "prefill ends, between chunks only when the pool needs the blocks: one-shot quality while "
    "memory allows) or every-chunk (after every chunk: at most its budget and one chunk held)",
    "decode_headroom": "tokens of growth a request that does not evict reserves at admission "
    "(fewer preemptions; 0: admit whenever the first chunk fits)",
    "swap_space": "host memory preempted requests' KVs are swapped out to, so they resume "
    "with what they held instead of being recomputed (0: always recompute)",
    "device": "torch device, e.g. cpu or cuda",
    "dtype": "weights and activations: auto (bfloat16 on CUDA, float32 on CPU), float32, "
    "bfloat16, float16",
    "kv_cache_dtype": "K/V storage: auto (the model dtype), bfloat16, float16, float32, fp8 "
    "(float8_e4m3fn, a scale per layer and KV head)",
    "attention_backend": "auto (triton on CUDA, torch on CPU), torch, triton",
    "enforce_eager": "run every decode step eagerly (default on CUDA with the Triton backend: "
    "replay CUDA graphs captured at start)",
    "packed_weights": "auto (on for float32 on CPU), on, off: a oneDNN-blocked copy of "
    "every linear weight, used for every product (faster steps on CPU, the weights' memory "
    "twice)",
    "seed": "seed of the sampler and of the random policy",
    "tensor_parallel_size": "ranks (GPUs, or CPU processes) the model is sharded over; "
    "kv_cache_memory is per rank. Under torchrun: the number of processes",
}

INT_OPTIONS = (
    "block_size",
    "max_num_seqs",
    "max_model_len",
    "max_num_batched_tokens",
    "prefill_chunk_size",
    "decode_headroom",
    "seed",
    "tensor_parallel_size",
)
# Flags that switch a False default on.
BOOL_OPTIONS = ("enforce_eager",)
CHOICES: dict[str, tuple[str, ...]] = {
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "kv_cache_dtype": ("auto", "bfloat16", "float16", "float32", "fp8"),
    "attention_backend": ("auto", "torch", "triton"),
    "packed_weights": ("auto", "on", "off"),
    "prefill_compression": ("when-needed", "every-chunk"),
}


def parse_rates(text: str) -> tuple[float, ...]:
    """``"1,2,4"`` -> ``(1, 2, 4)``: compression rates (numbers >= 1) for ``--rates``."""
    try:
        rates = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        message = f"rates must be comma-separated numbers: {text!r}"
        raise argparse.ArgumentTypeError(message) from err
    if not rates or any(not r >= 1 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be numbers >= 1: {text!r}")
    return tuple(int(r) if r.is_integer() else r for r in rates)


def parse_ints(text: str) -> tuple[int, ...]:
    """``"1,8,32"`` -> ``(1, 8, 32)``: positive integers, e.g. for ``--batch-sizes``."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1: {text!r}")
    return values


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _engine_defaults() -> dict[str, Any]:
    from kvcompress.engine import EngineConfig

    return {
        f.name: f.default
        for f in dataclasses.fields(EngineConfig)
        if f.default is not dataclasses.MISSING
    }


def add_engine_args(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """The engine options; ``defaults`` replace EngineConfig's for this command."""
    unknown = set(defaults) - set(ENGINE_OPTIONS)
    if unknown:
        raise ValueError(f"not engine options: {sorted(unknown)}")
    config_defaults = _engine_defaults() | defaults
    group = parser.add_argument_group("engine")
    for name, help in ENGINE_OPTIONS.items():
        default = config_defaults[name]
        if name in BOOL_OPTIONS:
            group.add_argument(_flag(name), action="store_true", default=default, help=help)
            continue
        kind = int if name in INT_OPTIONS else str
        shown = "" if default is None else f" (default: {default})"
        group.add_argument(
            _flag(name), type=kind, default=default, choices=CHOICES.get(name), help=help + shown
        )


def _typed(spec: ParamField):
    def parse(text: str):
        return spec.parse(text)

    parse.__name__ = spec.type.__name__  # argparse names the type in its error messages
    return parse


def add_compression_args(
    parser: argparse.ArgumentParser,
    title: str = "compression (defaults for every request)",
    exclude: tuple[str, ...] = (),
) -> None:
    """One option per compression field; an option not given leaves the field alone.

    Nullable fields accept ``none`` to clear a default.
    """
    group = parser.add_argument_group(title)
    # argparse cannot print an empty exclusive group, so make it only when it gets members.
    budgets = [name for name in BUDGET_FIELDS if name not in exclude]
    budget = group.add_mutually_exclusive_group() if len(budgets) > 1 else group
    for spec in compression_fields():
        if spec.name in exclude:
            continue
        target = budget if spec.name in BUDGET_FIELDS else group
        help = f"{spec.help} (default: {spec.default})"
        if spec.type is bool:
            target.add_argument(
                _flag(spec.name),
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help,
            )
            continue
        target.add_argument(
            _flag(spec.name),
            type=_typed(spec),
            choices=spec.choices,
            default=argparse.SUPPRESS,
            help=help,
        )


def compression_from_args(
    args: argparse.Namespace, base: CompressionParams | None = None
) -> CompressionParams:
    """``base`` (default: the schema's defaults) with the compression options given."""
    options = vars(args)  # options not given are absent (argparse.SUPPRESS)
    given = {spec.name: options[spec.name] for spec in compression_fields() if spec.name in options}
    return (base or CompressionParams()).with_overrides(given)


def engine_config_from_args(args: argparse.Namespace, **overrides: Any) -> EngineConfig:
    """The EngineConfig of the engine options (and compression options, if the command has
    them); ``overrides`` set fields the command fixes itself."""
    from kvcompress.engine import EngineConfig

    values = {name: getattr(args, name) for name in ENGINE_OPTIONS}
    values["compression"] = compression_from_args(args)
    return EngineConfig(**(values | overrides))
