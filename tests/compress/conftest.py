import pytest
import torch

from kvcompress.cache import CacheConfig, PagedKVCache


@pytest.fixture
def filled_cache():
    """A cache with sequences of given lengths whose metrics come from ``metric_fn``."""

    def build(lengths, metric_fn, layers=3, heads=2, block_size=4, blocks=2000):
        cfg = CacheConfig(
            num_layers=layers,
            num_kv_heads=heads,
            head_dim=2,
            block_size=block_size,
            kv_cache_memory=blocks * block_size * (2 * 2 * 4 + 8),
            max_seqs=16,
            max_model_len=1024,
        )
        cache = PagedKVCache(cfg)
        slots = [cache.allocate_seq() for _ in lengths]
        plan = cache.prepare_append(torch.tensor(slots), torch.tensor(lengths))
        # slots [L, H, N] -> metric per (layer, head, token position)
        layer = torch.arange(layers).view(-1, 1, 1).expand_as(plan.slots)
        head = torch.arange(heads).view(1, -1, 1).expand_as(plan.slots)
        pos = plan.positions.view(1, 1, -1).expand_as(plan.slots)
        seq = plan.token_seq_index.view(1, 1, -1).expand_as(plan.slots)
        values = metric_fn(layer, head, pos, seq).float()
        cache.metric.view(-1)[plan.slots.reshape(-1)] = values.reshape(-1)
        return cache, slots

    return build
