"""Evaluation plots: score vs compression rate per policy, and kept KVs per layer/head.

Figures are drawn on matplotlib's Agg canvas directly (`Figure` + `FigureCanvasAgg`),
without pyplot, so that plotting never touches the process-wide backend or needs a
display, and figures are freed as soon as they go out of scope.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from kvcompress.eval.results import EvalResult, KeptGrid, Row

__all__ = ["plot_explanation", "plot_kept_heatmap", "plot_scores", "write_plots"]

_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _curves(rows: Sequence[Row], metric: str) -> dict[str, dict[str, dict[float, float]]]:
    """panel -> policy -> rate -> metric, averaged over lengths weighted by samples.

    Panels are the tasks, plus "mean over tasks" (equal weight per task) when there are
    several, so one panel summarises the run.
    """
    sums: dict[tuple[str, str, float], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for row in rows:
        value = getattr(row, metric)
        if value is None:
            continue
        acc = sums[row.task, row.policy, row.rate]
        acc[0] += value * row.num_samples
        acc[1] += row.num_samples
    panels: dict[str, dict[str, dict[float, float]]] = defaultdict(lambda: defaultdict(dict))
    for (task, policy, rate), (total, weight) in sums.items():
        panels[task][policy][rate] = total / weight
    if len(panels) > 1:
        mean: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
        for curves in panels.values():
            for policy, points in curves.items():
                for rate, value in points.items():
                    mean[policy][rate].append(value)
        panels["mean over tasks"] = {
            p: {r: sum(v) / len(v) for r, v in pts.items()} for p, pts in mean.items()
        }
    return panels


def plot_scores(rows: Sequence[Row], path: str | Path, metrics: Sequence[str] = ("score",)) -> Path:
    """Metric vs requested compression rate, one line per policy, one panel per task.

    The rate axis is logarithmic (base 2), since rates are usually powers of two.
    """
    panels = [(m, task, curves) for m in metrics for task, curves in _curves(rows, m).items()]
    if not panels:
        raise ValueError("no rows with the metrics to plot")
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig = _figure(4.2 * cols, 3.2 * nrows)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    labels = {"score": "score", "agreement": "top-1 agreement", "kl": "KL(full || policy)"}
    policies = list(dict.fromkeys(p for _, _, curves in panels for p in curves))
    # Policies often tie (all at 100, or all at 0): distinct markers and some
    # transparency keep the lines underneath visible.
    styles = {
        p: {"color": "black", "linestyle": "--", "marker": "o"}
        if p == "full"
        else {"color": f"C{i}", "marker": _MARKERS[i % len(_MARKERS)], "alpha": 0.8}
        for i, p in enumerate(policies)
    }
    for ax, (metric, task, curves) in zip(axes, panels, strict=False):
        for policy, points in curves.items():
            rates = sorted(points)
            ax.plot(rates, [points[r] for r in rates], label=policy, **styles[policy])
        ax.set_xscale("log", base=2)
        ticks = sorted({r for points in curves.values() for r in points})
        ax.set_xticks(ticks, [f"{r:g}" for r in ticks])
        ax.minorticks_off()
        ax.set_xlabel("compression rate")
        ax.set_ylabel(labels.get(metric, metric))
        ax.set_title(task)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right upper", fontsize="small")
    target = Path(path)
    fig.savefig(target, dpi=120)
    return target


def plot_kept_heatmap(kept: KeptGrid, path: str | Path) -> Path:
    """KVs kept per (layer, KV head), one panel per policy, one colour scale."""
    grids = kept.grids
    if not grids:
        raise ValueError("no kept-KV grids to plot")
    import numpy as np

    arrays = {p: np.asarray(g, dtype=float).T for p, g in grids.items()}  # [head, layer]
    vmax = max(float(a.max()) for a in arrays.values())
    heads = next(iter(arrays.values())).shape[0]
    fig = _figure(9.0, 0.6 + len(arrays) * (0.35 * heads + 0.6))
    axes = fig.subplots(len(arrays), 1, squeeze=False).ravel()
    image = None
    for ax, (policy, array) in zip(axes, arrays.items(), strict=True):
        image = ax.imshow(array, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_ylabel(policy, rotation=0, ha="right", va="center")
        ax.set_yticks(range(heads))
        ax.tick_params(labelsize="x-small")
    axes[-1].set_xlabel("layer (rows of each panel: KV heads)")
    fig.colorbar(image, ax=list(axes), label="KVs kept")
    fig.suptitle(
        f"KVs kept per layer and KV head: {kept.task}, {kept.length} tokens, "
        f"rate {kept.rate:g}, sample {kept.sample}"
    )
    target = Path(path)
    fig.savefig(target, dpi=120)
    return target


def write_plots(result: EvalResult, plot_dir: str | Path) -> list[Path]:
    """The score plot and (when there is one) the heat map, named after the suite."""
    directory = Path(plot_dir)
    directory.mkdir(parents=True, exist_ok=True)
    metrics = ("agreement", "kl") if result.suite == "fidelity" else ("score",)
    written = [plot_scores(result.rows, directory / f"{result.suite}_scores.png", metrics)]
    if result.kept is not None:
        written.append(plot_kept_heatmap(result.kept, directory / f"{result.suite}_kept_kvs.png"))
    return written


def plot_explanation(explanation, path: str | Path) -> Path:
    """Per (layer, KV head): the budget (KVs kept), then the share of each span kept.

    The same layout as :func:`plot_kept_heatmap` (columns: layers, rows: KV heads), so the
    two figures read side by side.
    """
    import numpy as np

    budgets = np.asarray(explanation.budgets, dtype=float).T  # [head, layer]
    panels = [("KVs kept", budgets, None)]
    for s, span in enumerate(explanation.spans):
        share = np.asarray(explanation.held[..., s], dtype=float).T / max(len(span.positions), 1)
        panels.append((f"{span.label!r} kept", share, 1.0))
    heads = budgets.shape[0]
    fig = _figure(9.0, 0.6 + len(panels) * (0.35 * heads + 0.8))
    axes = fig.subplots(len(panels), 1, squeeze=False).ravel()
    for ax, (title, array, vmax) in zip(axes, panels, strict=True):
        image = ax.imshow(array, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(title, fontsize="small")
        ax.set_yticks(range(heads))
        ax.tick_params(labelsize="x-small")
        fig.colorbar(image, ax=ax, label="share" if vmax else "KVs")
    axes[-1].set_xlabel("layer (rows of each panel: KV heads)")
    fig.suptitle(f"what each KV head kept ({explanation.kept.seq_len} tokens)")
    target = Path(path)
    fig.savefig(target, dpi=120)
    return target
