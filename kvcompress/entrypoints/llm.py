"""The offline API: ``LLM(...).generate(prompts, params)``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from kvcompress.compress import CompressionParams, MetricConfig
from kvcompress.engine import EngineConfig, LLMEngine, RequestOutput, SamplingParams

Compression = CompressionParams | Mapping[str, Any] | None
Messages = list[dict[str, str]]


class LLM:
    """Generate with a model on a compressed, paged per-head KV cache.

    Compression keyword arguments (``policy``, ``compression_rate``, ``max_cache_tokens``,
    ``protected_window``, ``sinks``, ``metric``, ``compress_once``, ``compression_interval``)
    set the defaults for every request; a request's own ``compression`` overrides them.
    """

    def __init__(
        self,
        model: str | None = None,
        kv_cache_memory: int | str = "1GiB",
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_model_len: int | None = None,
        device: str = "cpu",
        seed: int = 0,
        window_size: int = 32,
        pool_kernel: int = 7,
        collection_buffer: int = 0,
        **compression: Any,
    ) -> None:
        self.engine = LLMEngine(
            EngineConfig(
                model=model,
                kv_cache_memory=kv_cache_memory,
                block_size=block_size,
                max_num_seqs=max_num_seqs,
                max_model_len=max_model_len,
                device=device,
                seed=seed,
                compression=CompressionParams(**compression),
                metric=MetricConfig(window_size, collection_buffer, pool_kernel),
            )
        )

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | Sequence[str] | Sequence[list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        compression: Compression | Sequence[Compression] = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the prompts' order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._run(list(prompts), sampling_params, compression, use_tqdm)

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        compression: Compression | Sequence[Compression] = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Like :meth:`generate`, for conversations formatted with the model's chat template."""
        if messages and isinstance(messages[0], dict):
            messages = [messages]
        prompts = [self.engine.apply_chat_template(list(m)) for m in messages]
        return self._run(prompts, sampling_params, compression, use_tqdm)

    def _run(self, prompts, sampling_params, compression, use_tqdm) -> list[RequestOutput]:
        n = len(prompts)
        samplings = _per_request(sampling_params, n, SamplingParams)
        compressions = _per_request(compression, n, (CompressionParams, Mapping))
        engine = self.engine
        ids = []
        try:
            for prompt, sp, cp in zip(prompts, samplings, compressions, strict=True):
                ids.append(engine.add_request(prompt, sp, cp))
        except Exception:
            for request_id in ids:
                engine.abort_request(request_id)
            raise
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=n, desc="generate", disable=not use_tqdm or n < 2, unit="req")

        def collect(out: RequestOutput) -> None:
            if out.finished and out.request_id in ids:
                results[out.request_id] = out
                bar.update(1)

        try:
            while len(results) < n:
                for out in engine.step():
                    collect(out)
        finally:
            bar.close()
        return [results[i] for i in ids]


def _per_request(value, n: int, kind) -> list:
    if value is None or isinstance(value, kind):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"got {len(values)} parameter sets for {n} prompts")
    return values
