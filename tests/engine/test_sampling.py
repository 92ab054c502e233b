import pytest
import torch

from kvcompress.engine.sampling import Sampler, SamplingParams


def test_greedy_takes_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 0.0]])
    out = Sampler()(logits, [SamplingParams(), SamplingParams()], [None, None])
    assert out.tolist() == [1, 0]


def test_top_k_one_is_greedy_even_at_high_temperature():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=2.0, top_k=1)] * 4
    assert torch.equal(Sampler()(logits, params, [None] * 4), logits.argmax(-1))


def test_top_k_restricts_support():
    logits = torch.arange(10.0).repeat(200, 1)
    out = Sampler(seed=3)(logits, [SamplingParams(temperature=1.0, top_k=3)] * 200, [None] * 200)
    assert set(out.tolist()) <= {7, 8, 9} and len(set(out.tolist())) == 3


def test_top_p_restricts_support():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(300, 1)
    out = Sampler(seed=1)(logits, [SamplingParams(temperature=1.0, top_p=0.7)] * 300, [None] * 300)
    assert set(out.tolist()) == {0, 1}


def test_temperature_sampling_follows_the_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1])
    n = 4000
    out = Sampler(seed=0)(
        probs.log().repeat(n, 1), [SamplingParams(temperature=1.0)] * n, [None] * n
    )
    freq = torch.bincount(out, minlength=3).float() / n
    assert torch.allclose(freq, probs, atol=0.03)


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(5))
    p = SamplingParams(temperature=1.0, seed=42)
    alone = Sampler(seed=1)(logits, [p], [torch.Generator().manual_seed(42)])
    other = torch.randn(3, 100)
    batch = Sampler(seed=9)(
        torch.cat([other, logits]),
        [SamplingParams(temperature=1.0)] * 3 + [p],
        [None, None, None, torch.Generator().manual_seed(42)],
    )
    assert int(batch[-1]) == int(alone[0])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_tokens=0),
        dict(max_tokens=-3),
        dict(temperature=-0.1),
        dict(temperature=2.5),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(stop=[""]),
    ],
)
def test_bad_sampling_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_stop_accepts_a_single_string():
    assert SamplingParams(stop="\n").stop == ("\n",)
