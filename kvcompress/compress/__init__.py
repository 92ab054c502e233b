"""KV-Compress: metrics, block-aligned eviction planning and compaction (engine-agnostic)."""

from kvcompress.compress.compressor import CompressionStats, Compressor
from kvcompress.compress.metrics import (
    METRICS,
    MetricConfig,
    decode_metric,
    pool_and_group,
    window_metric,
)
from kvcompress.compress.params import (
    BUDGET_FIELDS,
    POLICIES,
    CompressionParams,
    ParamField,
    Policy,
    compression_fields,
)
from kvcompress.compress.planner import EvictionPlan

__all__ = [
    "BUDGET_FIELDS",
    "METRICS",
    "POLICIES",
    "CompressionParams",
    "CompressionStats",
    "Compressor",
    "EvictionPlan",
    "MetricConfig",
    "ParamField",
    "Policy",
    "compression_fields",
    "decode_metric",
    "pool_and_group",
    "window_metric",
]
