"""Natural-text fidelity: windows, and agreement/KL against the full cache."""

from __future__ import annotations

import pytest

from kvcompress.eval.fidelity import FidelitySpec, run_fidelity, token_windows
from kvcompress.eval.sweep import SweepConfig
from tests.eval.shared_engine import shared_engine


def test_windows_spread_over_the_text():
    ids = list(range(100))
    windows = token_windows(ids, 20, 5, 3)
    assert [w.prefix[0] for w in windows] == [0, 37, 75]
    assert all(len(w.prefix) == 20 and len(w.continuation) == 5 for w in windows)
    last = windows[-1]
    assert last.prefix[-1] + 1 == last.continuation[0] and last.continuation[-1] == 99
    assert token_windows(ids, 20, 5, 1)[0].prefix[0] == 0


def test_text_too_short_for_a_window():
    with pytest.raises(ValueError, match="one window needs 30"):
        token_windows(list(range(10)), 20, 10, 1)


def test_spec_rejects_bad_sizes():
    with pytest.raises(ValueError, match="continuation_len >= 2"):
        FidelitySpec(continuation_len=1)


@pytest.mark.slow
def test_full_beats_random_at_high_rate():
    engine = shared_engine()
    sweep = SweepConfig(policies=("full", "kvcompress", "random"), rates=(1, 16))
    spec = FidelitySpec(prefix_len=384, continuation_len=16, num_windows=1)
    result = run_fidelity(engine, spec, sweep, progress=False)
    by = {(r.policy, r.rate): r for r in result.rows}
    assert len(result.rows) == 6
    full, kvc, rnd = by["full", 16], by["kvcompress", 16], by["random", 16]
    print(
        f"rate 16: kvcompress agreement {kvc.agreement:.3f} kl {kvc.kl:.4f}, "
        f"random agreement {rnd.agreement:.3f} kl {rnd.kl:.4f}"
    )
    # The reference agrees with itself; rate-1 rows are that same run.
    assert (full.agreement, full.kl, full.achieved_rate) == (1.0, 0.0, 1.0)
    assert (by["random", 1].agreement, by["random", 1].kl) == (1.0, 0.0)
    assert rnd.achieved_rate > 4 and kvc.achieved_rate > 4
    assert full.agreement >= rnd.agreement
    assert rnd.kl > 0
    # Attention-guided eviction keeps the distribution closer than random eviction.
    assert kvc.kl < rnd.kl
    assert {r.as_dict()["suite"] for r in result.rows} == {"fidelity"}
    assert set(result.kept.grids) == {"kvcompress", "random"}
