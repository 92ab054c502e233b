"""KV-Compress: metrics, scorers, block-aligned eviction planning and compaction
(engine-agnostic)."""

from kvcompress.compress.compressor import CompressionStats, Compressor
from kvcompress.compress.exchange import AllGatherExchange, ChunkScoreExchange, LocalExchange
from kvcompress.compress.inspection import KeptKVs, kept_kvs
from kvcompress.compress.metrics import (
    METRICS,
    MetricConfig,
    decode_metric,
    pool_and_group,
    pool_by_position,
    window_metric,
)
from kvcompress.compress.params import (
    BUDGET_FIELDS,
    POLICIES,
    CompressionParams,
    ParamField,
    Policy,
    PrefillSignature,
    compression_fields,
    exact_rates,
    shared_prefill_signature,
)
from kvcompress.compress.planner import EvictionPlan
from kvcompress.compress.scorers import (
    SCORERS,
    ScoreContext,
    Scorer,
    ScorerInputs,
    expected_attention,
    last_query_attention,
    queries_seen,
)

__all__ = [
    "BUDGET_FIELDS",
    "METRICS",
    "POLICIES",
    "SCORERS",
    "AllGatherExchange",
    "ChunkScoreExchange",
    "CompressionParams",
    "CompressionStats",
    "Compressor",
    "EvictionPlan",
    "KeptKVs",
    "LocalExchange",
    "MetricConfig",
    "ParamField",
    "Policy",
    "PrefillSignature",
    "ScoreContext",
    "Scorer",
    "ScorerInputs",
    "compression_fields",
    "decode_metric",
    "exact_rates",
    "expected_attention",
    "kept_kvs",
    "last_query_attention",
    "pool_and_group",
    "pool_by_position",
    "queries_seen",
    "shared_prefill_signature",
    "window_metric",
]
