"""The policy x rate grid of an evaluation, and the compression each grid point runs with.

Every (policy, rate) point runs in the same engine, so every policy keeps the same number
of KVs at a given rate (the engine derives one block budget per rate, whatever the
policy). Two shortcuts save most of the work on a CPU, and are exact rather than
approximations:

- ``full`` ignores the rate: it runs once per sample and its result is reported as the
  ``full`` row at every requested rate (the reference line of the plots);
- at rate 1 no policy evicts anything (`CompressionParams.evicts` is False), so every
  policy's rate-1 row is that same uncompressed run.

The other compression fields (protected window, sinks, metric, ...) come from one base
`CompressionParams` applied at every grid point, so the sweep's options and its JSON follow
the schema's fields. A policy of the grid may set some of them over the base, written
``policy:field=value[:field=value...]`` (``kvcompress:layer_floor=0.75``): a variant, with
rows and plot lines of its own under that name, so that settings are compared side by side
on the same prompts in one run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kvcompress.compress import POLICIES, CompressionParams, compression_fields, exact_rates

__all__ = [
    "DEFAULT_POLICIES",
    "DEFAULT_RATES",
    "FULL",
    "SWEPT_FIELDS",
    "Setting",
    "SweepConfig",
    "Variant",
    "parse_variant",
]

# Full first: it is the reference every other policy is compared with.
DEFAULT_POLICIES: tuple[str, ...] = (
    "full",
    "kvcompress",
    "uniform",
    "pyramid",
    "streaming",
    "h2o",
    "random",
)
DEFAULT_RATES: tuple[float, ...] = (1, 4, 16)

# The compression fields the grid sets at each point; the base must leave them alone.
SWEPT_FIELDS: tuple[str, ...] = ("policy", "compression_rate", "max_cache_tokens")
_SCHEMA_DEFAULTS = CompressionParams()


class Setting(NamedTuple):
    """One engine run of the grid: a policy (or a variant's name) at a requested rate."""

    policy: str
    rate: float


class Variant(NamedTuple):
    """A grid entry: a policy and the compression fields it sets over the sweep's base."""

    policy: str
    overrides: dict[str, Any]


_FIELDS_BY_NAME = {spec.name: spec for spec in compression_fields()}


def parse_variant(name: str) -> Variant:
    """``policy[:field=value...]`` -> its policy and fields, each value parsed as its field
    parses text (``ParamField.parse``); ``ValueError`` naming what is wrong.

    The values are checked as a request's are when the sweep builds its parameters."""
    policy, *pairs = name.split(":")
    if policy not in POLICIES:
        where = f" in {name!r}" if pairs else ""
        raise ValueError(f"unknown policy {policy}{where}; choose from {', '.join(POLICIES)}")
    if policy == "full" and pairs:
        raise ValueError(f"{name!r}: full evicts nothing, so it takes no settings")
    overrides: dict[str, Any] = {}
    for pair in pairs:
        field_name, sep, text = pair.partition("=")
        spec = _FIELDS_BY_NAME.get(field_name)
        if not sep or spec is None:
            raise ValueError(
                f"{name!r}: {pair!r} is not field=value with a compression field "
                f"(one of {', '.join(n for n in _FIELDS_BY_NAME if n not in SWEPT_FIELDS)})"
            )
        if field_name in SWEPT_FIELDS:
            raise ValueError(f"{name!r}: the sweep sets {field_name} itself")
        if field_name in overrides:
            raise ValueError(f"{name!r} sets {field_name} twice")
        try:
            overrides[field_name] = spec.parse(text)
        except ValueError as err:
            raise ValueError(f"{name!r}: {err}") from err
    return Variant(policy, overrides)


FULL = Setting("full", 1)


@dataclass(frozen=True)
class SweepConfig:
    """The policy x rate grid, the compression applied at every point, and the prompt mode.

    `compress_context_only` passes a prompt's question as the request's suffix, so that the
    context is compressed before the question is seen; `chat` wraps prompts in the model's
    chat template; `shared_prefill` prefills each prompt once for the pairs that can share
    it (see `kvcompress.eval.jobs`).
    """

    policies: tuple[str, ...] = DEFAULT_POLICIES
    rates: tuple[float, ...] = DEFAULT_RATES
    compression: CompressionParams = field(default_factory=exact_rates)
    compress_context_only: bool = False
    chat: bool = False
    # One prefill per prompt for every (policy, rate) whose prefill collects the same
    # metric, each compressed once after the whole prompt (see `jobs`); False: one
    # request per pair, prefilled in chunks as a served request is.
    shared_prefill: bool = True

    def __post_init__(self) -> None:
        if not self.policies:
            raise ValueError("no policies to evaluate")
        for name in self.policies:
            parse_variant(name)
        if not self.rates or any(not r >= 1 for r in self.rates):
            raise ValueError(f"compression rates must be numbers >= 1, got {self.rates}")
        # A base policy or budget would be silently replaced at every grid point.
        base, schema = self.compression, _SCHEMA_DEFAULTS
        swept = [n for n in SWEPT_FIELDS if getattr(base, n) != getattr(schema, n)]
        if swept:
            raise ValueError(f"the sweep sets {', '.join(swept)} itself; leave it out of the base")
        # A variant's values are checked here, before any prompt runs.
        for setting in self.settings():
            try:
                self.params(setting)
            except ValueError as err:
                raise ValueError(f"{setting.policy!r}: {err}") from err

    def run_setting(self, policy: str, rate: float) -> Setting:
        """The run whose result stands for (policy, rate): see the module docstring."""
        if policy == "full" or rate <= 1:
            return FULL
        return Setting(policy, rate)

    def settings(self) -> list[Setting]:
        """Distinct runs the grid needs, the uncompressed reference first."""
        runs = {self.run_setting(p, r): None for p in self.policies for r in self.rates}
        return sorted(runs, key=lambda s: s != FULL)

    def params(self, setting: Setting) -> CompressionParams:
        """The request parameters of one run: the base, with the variant's fields if the
        setting names one, and the setting's policy and rate.

        Every field is given, so the engine's own defaults never change what is measured.
        """
        policy, overrides = parse_variant(setting.policy)
        rate = None if setting == FULL else float(setting.rate)
        grid_point = {"policy": policy, "compression_rate": rate}
        return CompressionParams(**(self.compression.to_dict() | overrides | grid_point))

    def heatmap_rate(self) -> float | None:
        """The rate whose kept-KV grids are kept for the heat map: the highest one."""
        evicting = [r for r in self.rates if r > 1]
        return max(evicting) if evicting else None

    def to_dict(self) -> dict[str, Any]:
        """The grid and the base compression (its swept fields left out), for the JSON."""
        base = {k: v for k, v in self.compression.to_dict().items() if k not in SWEPT_FIELDS}
        return {
            "policies": list(self.policies),
            "rates": list(self.rates),
            "compression": base,
            "compress_context_only": self.compress_context_only,
            "chat": self.chat,
            "shared_prefill": self.shared_prefill,
        }
