"""Tiny random Llama, Mistral and Qwen2 configs through the paged per-head cache match
transformers: batched prefill of ragged prompts, then batched decode steps."""

from __future__ import annotations

import pytest
import torch

from kvcompress.attention import TorchAttentionBackend
from kvcompress.cache import CacheConfig, PagedKVCache
from kvcompress.compress import CompressionParams
from kvcompress.engine.model_runner import ModelRunner
from kvcompress.engine.sampling import SamplingParams
from kvcompress.engine.sequence import Sequence
from kvcompress.models import LlamaForCausalLM, ModelConfig
from tests.models.test_parity import BUILDERS, _random_hf


@pytest.mark.parametrize("collect_metric", [False, True], ids=["fused", "with-metric"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_paged_prefill_and_decode_match_transformers(name: str, collect_metric: bool) -> None:
    hf = _random_hf(name)
    config = ModelConfig.from_hf(hf.config)
    cache = PagedKVCache(
        CacheConfig(
            num_layers=config.num_layers,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            kv_cache_memory="16MiB",
            block_size=4,
            max_seqs=4,
            max_model_len=128,
        )
    )
    model = LlamaForCausalLM(config, TorchAttentionBackend(cache)).eval()
    model.load_state_dict(hf.state_dict())
    runner = ModelRunner(model, cache, torch.device("cpu"))
    # Evicting parameters make the backend collect the metric; nothing is compressed here.
    params = CompressionParams(compression_rate=2) if collect_metric else CompressionParams()
    gen = torch.Generator().manual_seed(2)
    vocab = hf.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (13, 30)]
    seqs = [Sequence(f"s{i}", p, SamplingParams(), params) for i, p in enumerate(prompts)]
    for seq in seqs:
        seq.slot = cache.allocate_seq()

    got = [runner.run(seqs, is_prefill=True)]
    for _ in range(6):
        for seq in seqs:
            seq.output_token_ids.append(int(torch.randint(0, vocab, (1,), generator=gen)))
        got.append(runner.run(seqs, is_prefill=False))

    with torch.inference_mode():
        for i, seq in enumerate(seqs):
            expected = hf(input_ids=torch.tensor([seq.token_ids])).logits[0]
            n = len(seq.prompt_token_ids)
            rows = torch.stack([step[i] for step in got])  # logits after each fed token
            torch.testing.assert_close(rows, expected[n - 1 :], atol=2e-4, rtol=2e-4)
