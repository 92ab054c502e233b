import pytest
import torch

from kvcompress.cache import CacheConfig, parse_size
from kvcompress.cache.config import METADATA_BYTES_PER_KV


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GiB", 2 << 30),
        ("512MB", 512_000_000),
        ("1.5 KiB", 1536),
        ("4096", 4096),
        (1 << 20, 1 << 20),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "-1GiB", "2 parsecs", "GiB", 0, -5, True])
def test_parse_size_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_budget_counts_metadata():
    cfg = CacheConfig(
        num_layers=2, num_kv_heads=2, head_dim=8, kv_cache_memory=100_000, block_size=4
    )
    per_kv = 2 * 8 * 4 + METADATA_BYTES_PER_KV
    assert cfg.bytes_per_block == 4 * per_kv
    assert cfg.num_blocks == 100_000 // (4 * per_kv)


def test_half_precision_halves_kv_bytes():
    a = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=64, kv_cache_memory="1MiB")
    b = CacheConfig(
        num_layers=1, num_kv_heads=1, head_dim=64, kv_cache_memory="1MiB", dtype=torch.float16
    )
    assert b.bytes_per_kv == 2 * 64 * 2 + METADATA_BYTES_PER_KV < a.bytes_per_kv


@pytest.mark.parametrize("block_size", [0, 3, 12, 256, -16, 2.0])
def test_block_size_must_be_power_of_two_up_to_128(block_size):
    with pytest.raises(ValueError, match="block_size"):
        CacheConfig(num_layers=1, num_kv_heads=1, head_dim=8, block_size=block_size)


@pytest.mark.parametrize("block_size", [1, 2, 4, 8, 16, 32, 64, 128])
def test_every_power_of_two_block_size_is_accepted(block_size):
    CacheConfig(
        num_layers=1, num_kv_heads=1, head_dim=8, block_size=block_size, kv_cache_memory="1MiB"
    )


@pytest.mark.parametrize(
    "field", ["num_layers", "num_kv_heads", "head_dim", "max_seqs", "max_model_len"]
)
def test_negative_sizes_rejected(field):
    kwargs = dict(num_layers=1, num_kv_heads=1, head_dim=8)
    kwargs[field] = -1
    with pytest.raises(ValueError, match=field):
        CacheConfig(**kwargs)


def test_budget_too_small_for_one_block_per_head():
    with pytest.raises(ValueError, match="one block per"):
        CacheConfig(num_layers=30, num_kv_heads=3, head_dim=64, kv_cache_memory="100KiB")
