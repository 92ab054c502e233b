"""``kvcompress eval``: quality kept by each compression policy, against the full cache.

Suites:

- ``ruler`` (default): synthetic long-context tasks (`kvcompress.eval.ruler`), scored
  by string match, 0-100;
- ``fidelity``: teacher-forced natural text, top-1 agreement and KL vs the full cache;
- ``longbench``: the user's LongBench JSONL files (``--data-dir``), each subset scored
  with its own metric, 0-100.

Cost. Every prompt runs once uncompressed (``full`` at every rate, and every policy's
rate-1 row) and once per (policy, rate > 1) pair. By default (``--shared-prefill``) the
pairs share their prompt's prefill: it is prefilled once, whole, for all the pairs whose
prefill collects the same metric (one prefill for kvcompress, uniform, pyramid, streaming
and random, another for h2o's L1 metric), and forks into one request per pair, each then
compressed by its own policy and rate. Each pair is thus compressed once after the whole
prompt's prefill (one-shot, the paper's setting) whatever ``--prefill-chunk-size`` says.
``--no-shared-prefill`` prefills the prompt again for every pair, in chunks compressed as
they come, as a served request is; the JSON records which mode ran (``shared_prefill``).
With ``--compression-interval``, a pair's later compressions read a metric that its sibling
pairs' decodes also add to where they still share blocks; compare such sweeps per pair.
The cost grows linearly with the lengths, samples or windows and with the number of
pairs; add them for tighter numbers.

Chat template. RULER prompts are fed raw by default; ``--chat`` wraps context + query as
the user message and puts the question's answer prefix ("The pass key is") after the
assistant header. Raw is the default because a RULER question ends with that answer
prefix, which a plain completion continues directly: the template buys nothing on
full-cache scores and loses the pass key sooner under compression (measurements in the
README).
`--seed` seeds both the task generator and the engine (the random policy).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from kvcompress.compress import POLICIES, exact_rates
from kvcompress.entrypoints.cli.args import (
    add_compression_args,
    add_engine_args,
    compression_from_args,
    engine_config_from_args,
    parse_rates,
)
from kvcompress.eval import (
    DEFAULT_POLICIES,
    DEFAULT_RATES,
    SUBSETS,
    SWEPT_FIELDS,
    TASKS,
    EvalResult,
    FidelitySpec,
    LongBenchSpec,
    RulerSpec,
    SweepConfig,
    available_subsets,
    format_cell,
    parse_variant,
    read_text,
    run_fidelity,
    run_longbench,
    run_ruler,
    write_plots,
)
from kvcompress.report import format_table, jsonable, print_json, write_csv

__all__ = ["add_eval_parser", "default_chat", "evaluate", "run_eval"]

SUITES = ("ruler", "fidelity", "longbench")


def _default(spec: type, name: str) -> Any:
    """The default of a suite spec's field: the options show and use the spec's own."""
    return next(f.default for f in dataclasses.fields(spec) if f.name == name)


def _joined(values: Collection[Any]) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


# --- Argument types -----------------------------------------------------------------------


def _names(known: Collection[str], what: str) -> Callable[[str], tuple[str, ...]]:
    """A comma-separated list of known names, or "all" (in the registry's order)."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        if names == ("all",):
            return tuple(known)
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(unknown) or repr(text)}; "
                f"choose from {', '.join(known)} (comma-separated) or all"
            )
        return tuple(dict.fromkeys(names))  # drop repeats, keep order

    return parse


def _policies(text: str) -> tuple[str, ...]:
    """Policies or variants (``policy:field=value...``), comma-separated; "all" stands for
    every policy (``all,kvcompress:layer_floor=0.75``: every policy and a variant)."""
    every = ("full", *(p for p in POLICIES if p != "full"))
    given = [n.strip() for n in text.split(",") if n.strip()]
    names = tuple(dict.fromkeys(p for n in given for p in (every if n == "all" else (n,))))
    if not names:
        raise argparse.ArgumentTypeError(f"no policy in {text!r}")
    for name in names:
        try:
            parse_variant(name)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err
    return names


def _lengths(minimum: int) -> Callable[[str], tuple[int, ...]]:
    what = "lengths"

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = [float(x) for x in text.split(",") if x.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{what} must be comma-separated numbers") from err
        if not values or any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"{what} must be numbers >= {minimum:g}: {text!r}")
        if any(not v.is_integer() for v in values):
            raise argparse.ArgumentTypeError(f"{what} must be whole numbers: {text!r}")
        return tuple(dict.fromkeys(int(v) for v in values))

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


# --- Parser -----------------------------------------------------------------------------------


def add_eval_parser(commands) -> argparse.ArgumentParser:
    """Register ``eval`` on a subparsers object; its handler is ``args.func``."""
    p = commands.add_parser(
        "eval",
        help="quality kept by each compression policy vs the full cache",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--suite", choices=SUITES, default="ruler")
    sweep = p.add_argument_group("sweep")
    sweep.add_argument(
        "--policies",
        type=_policies,
        default=DEFAULT_POLICIES,
        help="comma-separated; all: every policy (default: all). A policy may set "
        "compression fields over the base, as a variant with rows of its own: "
        "POLICY:FIELD=VALUE[:FIELD=VALUE] (e.g. all,kvcompress:layer_floor=0.75)",
    )
    sweep.add_argument(
        "--rates",
        type=parse_rates,
        default=DEFAULT_RATES,
        help=f"requested compression rates (default: {_joined(DEFAULT_RATES)})",
    )
    sweep.add_argument(
        "--compress-context-only",
        action="store_true",
        help="compress the context before the question is fed (default: question included)",
    )
    sweep.add_argument(
        "--shared-prefill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="prefill each prompt once for every (policy, rate) pair that can share it, "
        "each pair compressed once after the whole prompt whatever --prefill-chunk-size "
        "(default: on; --no-shared-prefill: one chunked prefill per pair; see above)",
    )
    sweep.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap prompts in the chat template (default: off for ruler, on for longbench "
        "when the model has a template; see above)",
    )
    add_compression_args(p, "compression (at every grid point)", exclude=SWEPT_FIELDS)
    ruler = p.add_argument_group("ruler / longbench")
    ruler.add_argument(
        "--tasks",
        type=_names(tuple(TASKS), "RULER task"),
        default=_default(RulerSpec, "tasks"),
        help=f"comma-separated, or all (default: {_joined(_default(RulerSpec, 'tasks'))})",
    )
    ruler.add_argument(
        "--lengths",
        type=_lengths(64),
        default=None,
        help="prompt lengths in tokens, chat template included (default: "
        f"{_joined(_default(RulerSpec, 'lengths'))} for ruler, "
        f"{_joined(_default(LongBenchSpec, 'lengths'))} for longbench; "
        "fidelity uses --prefix-len)",
    )
    ruler.add_argument(
        "--num-samples",
        type=_positive_int,
        default=_default(RulerSpec, "num_samples"),
        help="samples per task and length (default: %(default)s)",
    )
    ruler.add_argument("--data-dir", help="LongBench folder with <subset>.jsonl files")
    ruler.add_argument(
        "--subsets",
        type=_names(tuple(SUBSETS), "LongBench subset"),
        default=None,
        help="comma-separated (default: every supported subset found in --data-dir)",
    )
    ruler.add_argument(
        "--limit",
        type=_positive_int,
        default=_default(LongBenchSpec, "limit"),
        help="examples per subset (default: %(default)s)",
    )
    fid = p.add_argument_group("fidelity")
    fid.add_argument("--text-file", help="UTF-8 text (default: CPython's pydoc topics)")
    for name in ("prefix_len", "continuation_len", "num_windows"):
        fid.add_argument(
            "--" + name.replace("_", "-"),
            type=_positive_int,
            default=_default(FidelitySpec, name),
            help="(default: %(default)s)",
        )
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="one JSON document on stdout")
    out.add_argument("--csv", metavar="PATH", help="also write the rows as CSV")
    out.add_argument("--plot-dir", metavar="DIR", help="write score and kept-KV plots here")
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_engine_args(p, kv_cache_memory="2GiB")
    p.set_defaults(func=run_eval)
    return p


# --- Running ----------------------------------------------------------------------------------


def _sweep(args: argparse.Namespace) -> SweepConfig:
    # None (the default) is settled once the tokenizer is loaded: see `default_chat`.
    chat = bool(args.chat)
    return SweepConfig(
        policies=tuple(args.policies),
        rates=tuple(args.rates),
        compression=exact_rates().with_overrides(compression_from_args(args)),
        compress_context_only=args.compress_context_only,
        chat=chat,
        shared_prefill=args.shared_prefill,
    )


def default_chat(suite: str, has_template: bool) -> bool:
    """Whether prompts go through the chat template when neither --chat nor --no-chat is given.

    RULER: no. Its questions end with an answer prefix ("... The pass key is"), which a
    plain completion continues directly; the template buys nothing on full-cache scores
    and loses the pass key sooner under compression (see the module docstring). LongBench:
    yes, as LongBench itself does for instruct models (except the subsets whose
    `SubsetSpec.chat` is False: few-shot and code completion).
    """
    return suite == "longbench" and has_template


def _lengths_given(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    # Absent: the suite spec's own default lengths apply.
    return {"lengths": tuple(args.lengths)} if args.lengths else {}


def _longbench_spec(args: argparse.Namespace) -> LongBenchSpec:
    if not args.data_dir:
        raise ValueError(
            "--suite longbench needs --data-dir: a folder with one LongBench JSONL file per "
            "subset (e.g. hotpotqa.jsonl); nothing is downloaded"
        )
    if not Path(args.data_dir).is_dir():
        raise ValueError(f"LongBench data directory not found: {args.data_dir}")
    subsets = args.subsets or tuple(available_subsets(args.data_dir))
    if not subsets:
        raise ValueError(
            f"no LongBench subset files in {args.data_dir}; expected e.g. hotpotqa.jsonl "
            f"(supported: {', '.join(SUBSETS)})"
        )
    missing = [s for s in subsets if not (Path(args.data_dir) / f"{s}.jsonl").is_file()]
    if missing:
        raise ValueError(
            f"LongBench subset file(s) missing from {args.data_dir}: "
            + ", ".join(f"{s}.jsonl" for s in missing)
        )
    return LongBenchSpec(args.data_dir, tuple(subsets), limit=args.limit, **_lengths_given(args))


def _fidelity_spec(args: argparse.Namespace) -> FidelitySpec:
    text, source = None, "pydoc"
    if args.text_file:
        try:
            text = read_text(args.text_file)
        except (FileNotFoundError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read --text-file: {err}") from err
        source = Path(args.text_file).name
    return FidelitySpec(text, source, args.prefix_len, args.continuation_len, args.num_windows)


def _spec(args: argparse.Namespace) -> RulerSpec | LongBenchSpec | FidelitySpec:
    if args.suite == "ruler":
        lengths = _lengths_given(args)
        return RulerSpec(tuple(args.tasks), num_samples=args.num_samples, seed=args.seed, **lengths)
    if args.suite == "longbench":
        return _longbench_spec(args)
    return _fidelity_spec(args)


def evaluate(args: argparse.Namespace, engine=None) -> EvalResult:
    """Validate the arguments, then run the suite (on `engine`, or a new one)."""
    sweep = _sweep(args)
    spec = _spec(args)  # every argument is checked before the model loads
    if engine is None:
        from kvcompress.engine import LLMEngine

        engine = LLMEngine(engine_config_from_args(args))
    if args.chat is None:
        has_template = bool(getattr(engine.tokenizer, "chat_template", None))
        sweep = dataclasses.replace(sweep, chat=default_chat(args.suite, has_template))
    progress = not args.no_progress
    if isinstance(spec, RulerSpec):
        return run_ruler(engine, spec, sweep, progress)
    if isinstance(spec, LongBenchSpec):
        return run_longbench(engine, spec, sweep, progress)
    return run_fidelity(engine, spec, sweep, progress)


def _summary(result: EvalResult) -> str:
    c = result.config
    what = (
        f"{c['source']}: {c['num_windows']} windows, prefix {c['prefix_len']} + "
        f"{c['continuation_len']} teacher-forced tokens"
        if result.suite == "fidelity"
        else f"{c.get('num_samples', c.get('limit'))} samples per task and length"
    )
    if result.suite != "fidelity":
        mode = (
            "context compressed before the question"
            if c["compress_context_only"]
            else "question in the compressed prompt"
        )
        prefill = "one shared prefill per prompt" if c["shared_prefill"] else "a prefill per pair"
        what += f"; {mode}, chat template {'on' if c['chat'] else 'off'}, {prefill}"
    return (
        f"kvcompress eval --suite {result.suite}: {what}; protected window "
        f"{c['compression']['protected_window']}; {result.seconds:.0f} s"
    )


def run_eval(args: argparse.Namespace, engine=None) -> int:
    """The ``eval`` handler; `engine` lets a caller (a test) reuse a loaded model."""
    result = evaluate(args, engine)
    rows = [row.as_dict() for row in result.rows]
    if args.json:
        print_json(jsonable(result.document()))
    else:
        print(_summary(result))
        print(format_table(rows, format_cell))
    if args.csv:
        print(f"wrote {write_csv(rows, args.csv)}", file=sys.stderr)
    if args.plot_dir:
        for path in write_plots(result, args.plot_dir):
            print(f"wrote {path}", file=sys.stderr)
    return 0
