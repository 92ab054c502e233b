"""``kvcompress serve --tensor-parallel-size 2`` answers the openai client, and exits when a
rank dies (tiny random Llama: the server's start is what costs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from kvcompress.engine import SamplingParams
from kvcompress.entrypoints.openai.serving import free_port
from tests.engine.test_tensor_parallel import engine, tiny_llama


def wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def spawned_ranks(pid: int) -> list[int]:
    """The server's rank processes (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    out = []
    for child in map(int, children):
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in cmdline:
            out.append(child)
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny-4kv"), num_kv_heads=4, num_heads=8)


def test_serve_with_two_ranks_answers_and_exits_when_a_rank_dies(tiny_dir: Path) -> None:
    prompt = "w3 w9 w27 w4 w60"
    eng = engine(tiny_dir, 1)
    eng.add_request(prompt, SamplingParams(max_tokens=8, temperature=0))
    want = next(o for o in eng.run() if o.finished).text  # one device's answer
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--model", str(tiny_dir), "--port", str(port), "--block-size", "4"]
    args += ["--kv-cache-memory", "4MiB", "--tensor-parallel-size", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvcompress.entrypoints.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:

        def up() -> bool:
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(f"{url}/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=120)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        [model] = [m.id for m in client.models.list().data]
        out = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
        assert out.choices[0].text == want
        ranks = spawned_ranks(proc.pid)
        assert len(ranks) == 1
        os.kill(ranks[0], signal.SIGKILL)
        assert proc.wait(timeout=30) == 1
        assert "rank 1 (exit code -9) died" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
