"""Logprobs of generated and prompt tokens, against transformers' log-softmax on the same
weights (compression off, so they must agree to float32 rounding)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kvcompress.engine import RequestOutput, SamplingParams, TokenLogprob
from kvcompress.engine.request_stream import OutputChannel, RequestStream, merge_outputs
from kvcompress.errors import InvalidParameterError
from tests.engine.conftest import hf_logits, make_engine

TEXT = (
    "The river keeps its old course through the valley while lanterns on the bridge glow "
    "softly and travelers count the stones of the road"
)
ATOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On a shared 2-core machine torch's OpenMP threads spin-wait on each other whenever
    another process holds a core: one thread is many times faster here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def chunked():
    """Prefill chunks of 8 tokens: every prompt here spans several."""
    return make_engine(kv_cache_memory="64MiB", prefill_chunk_size=8, max_num_seqs=8)


def reference(hf, ids: list[int]) -> torch.Tensor:
    """transformers' log-probabilities of the next token after each position of ``ids``."""
    return hf_logits(hf, ids).log_softmax(dim=-1)


def check(entry: TokenLogprob, ref_row: torch.Tensor, token: int, k: int) -> None:
    assert entry.token_id == token
    assert entry.logprob == pytest.approx(float(ref_row[token]), abs=ATOL)
    values, ids = ref_row.topk(k)
    assert [t for t, _ in entry.top] == ids.tolist()
    assert [lp for _, lp in entry.top] == pytest.approx(values.tolist(), abs=ATOL)


def run_all(engine) -> dict[str, list[RequestOutput]]:
    outs: dict[str, list[RequestOutput]] = {}
    for out in engine.run():
        outs.setdefault(out.request_id, []).append(out)
    return outs


def test_generated_token_logprobs_match_transformers(chunked, hf_default_model):
    prompt = chunked.tokenize(TEXT)
    assert len(prompt) > 2 * 8
    # Raw logprobs: before temperature and top-k, whatever the sampler then does.
    chunked.add_request(prompt, SamplingParams(max_tokens=6, logprobs=5), request_id="greedy")
    sampled = SamplingParams(max_tokens=6, temperature=1.5, top_k=3, seed=1, logprobs=2)
    chunked.add_request(prompt[:11], sampled, request_id="sampled")
    chunked.add_request(prompt[:5], SamplingParams(max_tokens=4), request_id="plain")
    outs = run_all(chunked)
    for rid, p, k in (("greedy", prompt, 5), ("sampled", prompt[:11], 2)):
        gen = [t for o in outs[rid] for t in o.new_token_ids]
        got = [e for o in outs[rid] for e in o.logprobs or []]
        assert len(gen) == len(got) == 6
        assert all(o.prompt_logprobs is None for o in outs[rid])
        ref = reference(hf_default_model, p + gen)[len(p) - 1 : -1]
        for entry, row, token in zip(got, ref, gen, strict=True):
            check(entry, row, token, k)
    greedy = [e for o in outs["greedy"] for e in o.logprobs]
    assert all(e.top[0][0] == e.token_id for e in greedy)
    assert all(o.logprobs is None for o in outs["plain"])


def test_prompt_logprobs_gathered_chunk_by_chunk_match_transformers(chunked, hf_default_model):
    prompt = chunked.tokenize(TEXT)
    # A decoding request beside them: the scored chunks share steps with decode rows.
    chunked.add_request(prompt[:6], SamplingParams(max_tokens=12), request_id="decoding")
    scoring = SamplingParams(max_tokens=0, prompt_logprobs=4)
    chunked.add_request(prompt, scoring, request_id="score")
    both = SamplingParams(max_tokens=3, logprobs=0, prompt_logprobs=1)
    chunked.add_request(prompt[:20], both, request_id="both")
    outs = run_all(chunked)
    ref = reference(hf_default_model, prompt)

    # Scoring only: one output, right after the prefill, nothing sampled.
    (score,) = outs["score"]
    assert score.finished and score.finish_reason == "length"
    assert score.new_token_ids == score.token_ids == [] and score.num_output_tokens == 0
    assert score.prompt_token_ids == prompt
    assert score.prompt_logprobs[0] is None and len(score.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        check(score.prompt_logprobs[i], ref[i - 1], prompt[i], 4)

    # Generating too: the prompt's logprobs come once, with the first token.
    first, *rest = outs["both"]
    assert all(o.prompt_logprobs is None for o in rest)
    assert first.prompt_token_ids == prompt[:20] and len(first.new_token_ids) == 1
    for i in range(1, 20):
        check(first.prompt_logprobs[i], ref[i - 1], prompt[i], 1)
    gen = [t for o in outs["both"] for t in o.new_token_ids]
    ref_gen = reference(hf_default_model, prompt[:20] + gen)[19:-1]
    got = [e for o in outs["both"] for e in o.logprobs]
    for entry, row, token in zip(got, ref_gen, gen, strict=True):
        check(entry, row, token, 0)
    assert (
        chunked.stats().running == 0
        and chunked.capacity().free_blocks == chunked.capacity().num_blocks
    )


def test_a_one_token_prompt_is_scored_too(chunked):
    chunked.add_request([42], SamplingParams(max_tokens=0, prompt_logprobs=2), request_id="one")
    (out,) = run_all(chunked)["one"]
    assert out.prompt_logprobs == [None] and out.prompt_token_ids == [42] and out.finished


def test_logprobs_cost_nothing_unless_asked(engine, monkeypatch):
    """No row asks: nothing is ever normalised over the vocabulary."""

    def boom(*args, **kwargs):
        raise AssertionError("log_softmax computed for a request that did not ask")

    monkeypatch.setattr(torch.Tensor, "log_softmax", boom)
    monkeypatch.setattr(torch, "log_softmax", boom)
    monkeypatch.setattr(torch.nn.functional, "log_softmax", boom)
    engine.add_request(TEXT, SamplingParams(max_tokens=3, temperature=0.8, top_p=0.9, seed=0))
    outs = [o for o in engine.run()]
    assert outs[-1].finish_reason == "length"
    assert all(o.logprobs is None and o.prompt_logprobs is None for o in outs)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (dict(logprobs=21), "logprobs"),
        (dict(logprobs=-1), "logprobs"),
        (dict(logprobs=True), "logprobs"),
        (dict(prompt_logprobs=21), "prompt_logprobs"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=0, logprobs=1), "max_tokens"),
        (dict(max_tokens=-1, prompt_logprobs=0), "max_tokens"),
    ],
)
def test_bad_logprob_params(kwargs, param):
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param


def test_max_tokens_zero_is_allowed_only_for_scoring():
    assert SamplingParams(max_tokens=0, prompt_logprobs=0).max_tokens == 0


def test_prompt_logprobs_with_a_suffix_are_refused(engine):
    with pytest.raises(InvalidParameterError) as info:
        engine.add_request("context", SamplingParams(prompt_logprobs=1), suffix=" question?")
    assert info.value.param == "prompt_logprobs"


def _out(new: list[int], finished: bool = False, **kw) -> RequestOutput:
    entries = [TokenLogprob(t, -1.0, []) for t in new]
    return RequestOutput("r", "", new, 0, 3, finished, None, None, [], entries, **kw)


def test_merged_outputs_keep_every_token_and_the_prompt_logprobs():
    prompt = [None, TokenLogprob(7, -2.0, [])]
    merged = merge_outputs(_out([1], prompt_logprobs=prompt, prompt_token_ids=[6, 7]), _out([2]))
    assert merged.new_token_ids == [1, 2]
    assert [e.token_id for e in merged.logprobs] == [1, 2]
    assert merged.prompt_logprobs == prompt and merged.prompt_token_ids == [6, 7]


def test_a_slow_consumer_loses_no_logprobs():
    """The stream skips to the newest output when behind; what it skips is merged in."""

    async def main() -> list[RequestOutput]:
        channel = OutputChannel("r", asyncio.get_running_loop())
        for i in range(4):
            channel.put(_out([i], finished=i == 3))
        await asyncio.sleep(0)  # the puts land in the queue before anyone reads
        stream = RequestStream(None, channel, 3)  # type: ignore[arg-type]
        return [out async for out in stream]

    outs = asyncio.run(main())
    assert [t for o in outs for t in o.new_token_ids] == [0, 1, 2, 3]
    assert [e.token_id for o in outs for e in o.logprobs] == [0, 1, 2, 3]
