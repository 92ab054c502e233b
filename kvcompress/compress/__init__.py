"""KV-Compress: metrics, block-aligned eviction planning and compaction (engine-agnostic)."""

from kvcompress.compress.compressor import CompressionStats, Compressor
from kvcompress.compress.metrics import METRICS, MetricConfig, decode_metric, window_metric
from kvcompress.compress.params import POLICIES, CompressionParams, Policy
from kvcompress.compress.planner import EvictionPlan

__all__ = [
    "METRICS",
    "POLICIES",
    "CompressionParams",
    "CompressionStats",
    "Compressor",
    "EvictionPlan",
    "MetricConfig",
    "Policy",
    "decode_metric",
    "window_metric",
]
