"""``kvcompress eval``: quality kept by each compression policy, against the full cache.

Suites:

- ``ruler`` (default): synthetic long-context tasks (`kvcompress.eval.ruler`), scored
  by string match, 0-100;
- ``fidelity``: teacher-forced natural text, top-1 agreement and KL vs the full cache;
- ``longbench``: the user's LongBench JSONL files (``--data-dir``), each subset scored
  with its own metric, 0-100.

Cost. Each (policy, rate > 1) pair prefills every prompt again (the engine has no
prefix sharing), plus one uncompressed run that serves as ``full`` at every rate and as
every policy's rate-1 row. The cost grows linearly with the lengths, samples or windows
and with the number of such pairs; add them for tighter numbers.

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

from kvcompress.compress import POLICIES
from kvcompress.entrypoints.cli.args import add_engine_args, engine_config_from_args, parse_rates
from kvcompress.eval.longbench import SUBSETS
from kvcompress.eval.ruler import TASKS
from kvcompress.eval.runner import (
    DEFAULT_POLICIES,
    DEFAULT_RATES,
    EvalResult,
    LongBenchSpec,
    RulerSpec,
    SweepConfig,
)

__all__ = ["add_eval_parser", "default_chat", "evaluate", "run_eval"]

SUITES = ("ruler", "fidelity", "longbench")
DEFAULT_TASKS = ("niah_single", "niah_multikey")
DEFAULT_LENGTHS = {"ruler": (1024,), "longbench": (2048,)}


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
        type=_names(("full", *(p for p in POLICIES if p != "full")), "policy"),
        default=DEFAULT_POLICIES,
        help="comma-separated, or all (default: all)",
    )
    sweep.add_argument(
        "--rates",
        type=parse_rates,
        default=DEFAULT_RATES,
        help="requested compression rates (default: 1,4,16)",
    )
    sweep.add_argument("--protected-window", type=int, default=32)
    sweep.add_argument(
        "--compress-context-only",
        action="store_true",
        help="compress the context before the question is fed (default: question included)",
    )
    sweep.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap prompts in the chat template (default: off for ruler, on for longbench "
        "when the model has a template; see the module docstring)",
    )
    ruler = p.add_argument_group("ruler / longbench")
    ruler.add_argument(
        "--tasks",
        type=_names(tuple(TASKS), "RULER task"),
        default=DEFAULT_TASKS,
        help="comma-separated, or all (default: niah_single,niah_multikey)",
    )
    ruler.add_argument(
        "--lengths",
        type=_lengths(64),
        default=None,
        help="prompt lengths in tokens, chat template included (default: 1024 for ruler, "
        "2048 for longbench; fidelity uses --prefix-len)",
    )
    ruler.add_argument("--num-samples", type=_positive_int, default=4)
    ruler.add_argument("--data-dir", help="LongBench folder with <subset>.jsonl files")
    ruler.add_argument(
        "--subsets",
        type=_names(tuple(SUBSETS), "LongBench subset"),
        default=None,
        help="comma-separated (default: every supported subset found in --data-dir)",
    )
    ruler.add_argument("--limit", type=_positive_int, default=16, help="examples per subset")
    fid = p.add_argument_group("fidelity")
    fid.add_argument("--text-file", help="UTF-8 text (default: CPython's pydoc topics)")
    fid.add_argument("--prefix-len", type=_positive_int, default=2048)
    fid.add_argument("--continuation-len", type=_positive_int, default=64)
    fid.add_argument("--num-windows", type=_positive_int, default=2)
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
        protected_window=args.protected_window,
        compress_context_only=args.compress_context_only,
        chat=chat,
    )


def default_chat(suite: str, has_template: bool) -> bool:
    """Whether prompts go through the chat template when neither --chat nor --no-chat is given.

    RULER: no. Its questions end with an answer prefix ("... The pass key is"), which a
    plain completion continues directly; the template buys nothing on full-cache scores
    and loses the pass key sooner under compression (see the module docstring). LongBench:
    yes, as LongBench itself does for instruct models (except its few-shot and code
    subsets, see `runner.LONGBENCH_NO_CHAT`).
    """
    return suite == "longbench" and has_template


def _longbench_spec(args: argparse.Namespace) -> LongBenchSpec:
    from kvcompress.eval.longbench import available_subsets

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
    lengths = tuple(args.lengths or DEFAULT_LENGTHS["longbench"])
    return LongBenchSpec(args.data_dir, tuple(subsets), lengths, args.limit)


def _fidelity_spec(args: argparse.Namespace):
    from kvcompress.eval.fidelity import FidelitySpec
    from kvcompress.eval.texts import read_text

    text, source = None, "pydoc"
    if args.text_file:
        try:
            text = read_text(args.text_file)
        except (FileNotFoundError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read --text-file: {err}") from err
        source = Path(args.text_file).name
    return FidelitySpec(text, source, args.prefix_len, args.continuation_len, args.num_windows)


def _spec(args: argparse.Namespace):
    if args.suite == "ruler":
        lengths = tuple(args.lengths or DEFAULT_LENGTHS["ruler"])
        return RulerSpec(tuple(args.tasks), lengths, args.num_samples, args.seed)
    if args.suite == "longbench":
        return _longbench_spec(args)
    return _fidelity_spec(args)


def _engine(args: argparse.Namespace):
    from kvcompress.compress import CompressionParams
    from kvcompress.engine import LLMEngine

    # Every sweep request carries its own compression parameters; the default is unused.
    return LLMEngine(engine_config_from_args(args, compression=CompressionParams()))


def evaluate(args: argparse.Namespace, engine=None) -> EvalResult:
    """Validate the arguments, then run the suite (on `engine`, or a new one)."""
    sweep = _sweep(args)
    spec = _spec(args)  # every argument is checked before the model loads
    engine = engine or _engine(args)
    if args.chat is None:
        has_template = bool(getattr(engine.tokenizer, "chat_template", None))
        sweep = dataclasses.replace(sweep, chat=default_chat(args.suite, has_template))
    progress = not args.no_progress
    if args.suite == "ruler":
        from kvcompress.eval.runner import run_ruler

        return run_ruler(engine, spec, sweep, progress)
    if args.suite == "longbench":
        from kvcompress.eval.runner import run_longbench

        return run_longbench(engine, spec, sweep, progress)
    from kvcompress.eval.fidelity import run_fidelity

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
        what += f"; {mode}, chat template {'on' if c['chat'] else 'off'}"
    return (
        f"kvcompress eval --suite {result.suite}: {what}; protected window "
        f"{c['protected_window']}; {result.seconds:.0f} s"
    )


def run_eval(args: argparse.Namespace, engine=None) -> int:
    """The ``eval`` handler; `engine` lets a caller (a test) reuse a loaded model."""
    from kvcompress.eval.report import format_table, print_json, write_csv

    result = evaluate(args, engine)
    if args.json:
        print_json(result)
    else:
        print(_summary(result))
        print(format_table(result.rows))
    if args.csv:
        print(f"wrote {write_csv(result.rows, args.csv)}", file=sys.stderr)
    if args.plot_dir:
        from kvcompress.eval.plots import write_plots

        for path in write_plots(result, args.plot_dir):
            print(f"wrote {path}", file=sys.stderr)
    return 0
