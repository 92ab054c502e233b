"""The offline API: ``LLM(...).generate(prompts, params)``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from kvcompress.compress import CompressionParams, compression_fields
from kvcompress.engine import EngineConfig, LLMEngine, RequestOutput, SamplingParams
from kvcompress.errors import InvalidParameterError

Compression = CompressionParams | Mapping[str, Any] | None
Messages = list[dict[str, str]]


def _split_options(model: str | None, options: dict[str, Any]) -> EngineConfig:
    """EngineConfig from flat keyword options: engine fields and compression fields
    (``policy``, ``compression_rate``, ``pool_kernel``, ...), each with its own class's
    defaults."""
    engine_names = {f.name for f in dataclasses.fields(EngineConfig)} - {"compression", "metric"}
    compression_names = {spec.name for spec in compression_fields()}
    unknown = set(options) - engine_names - compression_names
    if unknown:
        raise TypeError(
            f"LLM() got unknown option(s) {sorted(unknown)}; it takes EngineConfig and "
            "CompressionParams fields"
        )

    def pick(names: set[str]) -> dict[str, Any]:
        return {k: v for k, v in options.items() if k in names}

    return EngineConfig(
        model=model,
        **pick(engine_names),
        compression=CompressionParams(**pick(compression_names)),
    )


class LLM:
    """Generate with a model on a compressed, paged per-head KV cache.

    Keyword options are the fields of :class:`~kvcompress.engine.EngineConfig`
    (``kv_cache_memory``, ``block_size``, ``max_num_seqs``, ``device``, ...) and of
    :class:`~kvcompress.compress.CompressionParams` (``policy``, ``compression_rate``,
    ``max_cache_tokens``, ``protected_window``, the metric settings ``pool_kernel``,
    ``window_size`` and ``collection_buffer``, ...). The compression fields set the defaults
    of every request; a request's own ``compression`` overrides the fields it gives.
    """

    def __init__(self, model: str | None = None, **options: Any) -> None:
        self.engine = LLMEngine(_split_options(model, options))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def close(self) -> None:
        """Stop the engine's tensor-parallel ranks (see ``LLMEngine.close``)."""
        self.engine.close()

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
        if any(sp is not None and (sp.n > 1 or (sp.best_of or 1) > 1) for sp in samplings):
            # One RequestOutput per prompt here; the engine and the server return every choice.
            raise InvalidParameterError(
                "LLM returns one output per prompt: n > 1 and best_of > 1 are served by "
                "LLMEngine (one output per choice, with its index) and by the server",
                param="n",
            )
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
        wanted = set(ids)
        results: dict[str, RequestOutput] = {}
        with tqdm(total=n, desc="generate", disable=not use_tqdm or n < 2, unit="req") as bar:
            for out in engine.run():
                if out.finished and out.request_id in wanted:
                    results[out.request_id] = out
                    bar.update(1)
        return [results[i] for i in ids]


def _per_request(value, n: int, kind) -> list:
    if value is None or isinstance(value, kind):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"got {len(values)} parameter sets for {n} prompts")
    return values
