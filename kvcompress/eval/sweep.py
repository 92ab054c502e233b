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
the schema's fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kvcompress.compress import POLICIES, CompressionParams, exact_rates

__all__ = [
    "DEFAULT_POLICIES",
    "DEFAULT_RATES",
    "FULL",
    "SWEPT_FIELDS",
    "Setting",
    "SweepConfig",
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
    """One engine run of the grid: a policy at a requested rate."""

    policy: str
    rate: float


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
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown:
            raise ValueError(f"unknown policy {unknown}; choose from {', '.join(POLICIES)}")
        if not self.policies:
            raise ValueError("no policies to evaluate")
        if not self.rates or any(not r >= 1 for r in self.rates):
            raise ValueError(f"compression rates must be numbers >= 1, got {self.rates}")
        # A base policy or budget would be silently replaced at every grid point.
        base, schema = self.compression, _SCHEMA_DEFAULTS
        swept = [n for n in SWEPT_FIELDS if getattr(base, n) != getattr(schema, n)]
        if swept:
            raise ValueError(f"the sweep sets {', '.join(swept)} itself; leave it out of the base")

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
        """The request parameters of one run: the base with the setting's policy and rate.

        Every field is given, so the engine's own defaults never change what is measured.
        """
        rate = None if setting == FULL else float(setting.rate)
        return CompressionParams(
            **(self.compression.to_dict() | {"policy": setting.policy, "compression_rate": rate})
        )

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
