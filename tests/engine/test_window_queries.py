"""The expected query to come: the window's mean before RoPE, averaged over the positions
after it, checked against rotating query by query, position by position."""

from __future__ import annotations

import torch

from kvcompress.engine.window_queries import FUTURE_POSITIONS, WindowQueries
from kvcompress.models.rope import RotaryEmbedding, apply_rotary

LAYERS, HEADS, DIM = 2, 3, 8
ROTARY = RotaryEmbedding(DIM, 10_000.0, None)


def rotate(x: torch.Tensor, position: int, rotary: RotaryEmbedding = ROTARY) -> torch.Tensor:
    """``x [heads, D]`` rotated to ``position`` (negative: back towards 0)."""
    angles = position * rotary.inv_freq
    angles = torch.cat((angles, angles))
    return apply_rotary(x[None], angles.cos()[None], angles.sin()[None])[0]


def expected_query(
    queries: torch.Tensor, positions: list[int], rotary: RotaryEmbedding = ROTARY
) -> torch.Tensor:
    """``[L, Hq, D]`` of a window's post-RoPE ``queries [n, L, Hq, D]``, plainly."""
    out = torch.zeros(queries.shape[1:])
    for layer in range(queries.shape[1]):
        before = torch.stack(
            [rotate(q[layer], -p, rotary) for q, p in zip(queries, positions, strict=True)]
        ).mean(dim=0)
        ahead = range(positions[-1] + 1, positions[-1] + 1 + FUTURE_POSITIONS)
        out[layer] = torch.stack([rotate(before, p, rotary) for p in ahead]).mean(dim=0)
    return out


def test_two_windows_of_one_step_each_give_their_sequence_its_expected_query() -> None:
    store = WindowQueries(4, LAYERS, HEADS, DIM, torch.device("cpu"), ROTARY)
    positions = torch.tensor([0, 1, 2, 3, 700, 701, 702, 9])  # the step's flat tokens
    capture = store.capture([range(1, 4), range(4, 7)], [2, 0], positions)
    assert capture is not None
    queries = torch.randn(LAYERS, len(positions), HEADS, DIM, generator=torch.Generator())
    for layer in range(LAYERS):
        capture.keep(layer, queries[layer])
    store.finish()
    kept = store.get([2, 0, 1])
    assert kept is not None
    torch.testing.assert_close(
        kept[0], expected_query(queries[:, 1:4].transpose(0, 1), [1, 2, 3]), atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(
        kept[1],
        expected_query(queries[:, 4:7].transpose(0, 1), [700, 701, 702]),
        atol=1e-5,
        rtol=1e-4,
    )
    assert bool((kept[2] == 0).all())  # a slot no window wrote


def test_the_fast_frequencies_fade_and_the_slowest_keep_their_phase() -> None:
    """Averaged over the positions ahead, the pair that turns a radian per token averages
    out; the slowest (a thousandth of a radian per token) is carried almost unchanged."""
    store = WindowQueries(1, 1, 1, DIM, torch.device("cpu"), ROTARY)
    capture = store.capture([range(1)], [0], torch.tensor([0]))
    assert capture is not None
    capture.keep(0, torch.ones(1, 1, DIM))
    store.finish()
    kept = store.get([0])[0, 0, 0]
    half = DIM // 2
    fastest = kept[[0, half]].norm()
    slowest = kept[[half - 1, DIM - 1]].norm()
    assert fastest < 0.05 * 2**0.5 and slowest > 0.99 * 2**0.5


def test_a_step_that_keeps_no_window_leaves_the_rows_alone() -> None:
    """A step that failed after its capture leaves nothing behind for the next."""
    store = WindowQueries(2, LAYERS, HEADS, DIM, torch.device("cpu"), ROTARY)
    store.capture([range(2)], [1], torch.tensor([4, 5]))  # its forward pass never finishes
    assert store.capture([], [], torch.tensor([0])) is None
    store.finish()
    assert store.get([1]) is None
