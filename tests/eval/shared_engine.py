"""One engine on the default model for every eval test, loaded on first use.

Imported as ``tests.eval.shared_engine`` everywhere (the eval tests and the ``eval`` command's
tests), so that one run loads the model once.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def shared_engine():
    from kvcompress.engine import EngineConfig, LLMEngine

    # Other test runs share the CPU: one thread each avoids oversubscription.
    torch.set_num_threads(1)
    return LLMEngine(EngineConfig(kv_cache_memory="256MiB", max_num_seqs=16))
