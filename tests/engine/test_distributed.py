"""The engine's ranks: started, checked and stopped with it; the default model at TP=3.

Each test starts (and closes) its own tensor-parallel engine: one per process at a time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvcompress.engine import EngineConfig, LLMEngine, SamplingParams
from kvcompress.errors import WorkerFailedError
from tests.engine.conftest import prose_ids
from tests.engine.test_tensor_parallel import (
    assert_all_free,
    engine,
    greedy,
    prompts_of,
    tiny_llama,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny-4kv"), num_kv_heads=4, num_heads=8)


def test_replicated_kv_head_counts_once(tmp_path: Path) -> None:
    # One KV head, two ranks: each holds a replica; the selection must see it once.
    model = tiny_llama(tmp_path / "tiny-1kv", num_kv_heads=1, num_heads=2)
    prompts = prompts_of(128, (90,))
    want = greedy(engine(model, 1), prompts, 8)
    eng = engine(model, 2)
    try:
        assert greedy(eng, prompts, 8) == want
        assert_all_free(eng)
    finally:
        eng.close()
    # Closed: the rank exited cleanly (asked to, not killed), the rendezvous is gone.
    assert [p.exitcode for p in eng.ranks.procs] == [0]
    assert not Path(eng.ranks._rendezvous).exists()


def test_a_dead_rank_fails_the_engine_instead_of_hanging(tiny_dir: Path) -> None:
    eng = engine(tiny_dir, 2)
    try:
        eng.add_request(prompts_of(128, (30,))[0], SamplingParams(max_tokens=40))
        eng.step()
        proc = eng.ranks.procs[0]
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        with pytest.raises(WorkerFailedError, match=r"rank 1 \(exit code -9\) died"):
            list(eng.run())
        with pytest.raises(WorkerFailedError):  # and stays failed
            eng.step()
    finally:
        eng.close()
    assert not any(p.is_alive() for p in eng.ranks.procs)


def test_a_size_that_does_not_divide_the_heads_says_which_fit(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 .* divide the 8 query heads"):
        engine(tiny_dir, 3)


@pytest.mark.slow
def test_default_model_tp3_equals_one_device(engine: LLMEngine) -> None:
    # SmolLM2-135M: 9 query heads, 3 KV heads, one per rank. Three processes on a small CPU
    # are slow: one short prompt, a few tokens.
    prompt = prose_ids(engine, 48)
    options = {"kv_cache_memory": "64MiB", "block_size": 4, "max_num_seqs": 4}
    want = greedy(LLMEngine(EngineConfig(**options)), [prompt], 6)
    eng = LLMEngine(EngineConfig(tensor_parallel_size=3, **options))
    try:
        got = greedy(eng, [prompt], 6)
        assert got == want
        kept = torch.tensor(got["kvcompress-0"][2])
        assert kept.shape == (30, 3) and kept.sum() < 30 * 3 * (48 + 6)
        assert_all_free(eng)
    finally:
        eng.close()


def test_under_torchrun_rank_0_is_the_engine_and_the_others_serve_it(tiny_dir: Path) -> None:
    args = ["generate", "w3 w9 w27 w4", "--model", str(tiny_dir), "--max-tokens", "8"]
    args += ["--temperature", "0", "--block-size", "4", "--kv-cache-memory", "4MiB", "--json"]
    tp2 = ["--tensor-parallel-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "kvcompress.entrypoints.cli"]
    one = subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=120)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    two = subprocess.run(
        [*torchrun, "--nproc-per-node", "2", "-m", "kvcompress.entrypoints.cli", *args, *tp2],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    text = json.loads(one.stdout)["text"]
    assert text and json.loads(two.stdout)["text"] == text  # printed by rank 0 alone
