"""Score curves and kept-KV heat maps are written (no model)."""

from __future__ import annotations

from kvcompress.eval.plots import plot_kept_heatmap, plot_scores, write_plots
from kvcompress.eval.results import EvalResult, KeptGrid
from tests.eval.test_results import sample_rows


def test_plots_are_written(tmp_path):
    kept = KeptGrid("niah_single", 512, 8, 0, {"uniform": [[6, 6]] * 3, "kvcompress": [[4, 9]] * 3})
    result = EvalResult("ruler", sample_rows(), {}, kept)
    paths = write_plots(result, tmp_path / "plots")
    assert [p.name for p in paths] == ["ruler_scores.png", "ruler_kept_kvs.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert plot_scores(sample_rows(), tmp_path / "s.png").stat().st_size > 1000
    assert plot_kept_heatmap(kept, tmp_path / "k.png").stat().st_size > 1000
