"""The demo report's PNG plots: training curves, the dispersion histogram, lambda-control heatmaps and the
learned scheduler's probabilities, each written to a file and returned as its path.

matplotlib's object API with the Agg canvas: no pyplot state, no display needed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

# (train key, eval key, axis label) of the curves plotted over steps.
CURVES = {
    "loss": ("loss", "eval/loss", "loss"),
    "accuracy": ("rewards/accuracy", "eval/rewards/accuracy", "reward accuracy"),
    "margin": ("rewards/margin", "eval/rewards/margin", "reward margin"),
}


def finite(value: Any) -> float | None:
    """A float, or None for a missing, non-numeric or non-finite value (JSON has no NaN)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the history entries that carry a finite `key`."""
    points = [(finite(h.get("step")), finite(h.get(key))) for h in history]
    kept = [(s, v) for s, v in points if s is not None and v is not None]
    return [s for s, _ in kept], [v for _, v in kept]


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)  # attaches the Agg canvas: PNG rendering without any GUI backend
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what}", ha="center", va="center", transform=ax.transAxes)


def plot_curves(history: list[dict], names: Sequence[str], path: Path) -> Path:
    """One panel per curve of CURVES in `names`: train as a line, evaluation steps as markers."""
    fig = Figure(figsize=(5.5 * len(names), 3.8))
    for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
        train_key, eval_key, label = CURVES[name]
        drawn = False
        for key, style, legend in ((train_key, "-", "train"), (eval_key, "o--", "eval")):
            steps, values = _series(history, key)
            if steps:
                ax.plot(steps, values, style, label=legend)
                drawn = True
        if drawn:
            ax.legend()
        else:
            _no_data(ax, label)
        ax.set(xlabel="optimizer step", ylabel=label, title=f"{label} over steps")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_dispersion(dispersion: Sequence[float] | np.ndarray, path: Path) -> Path:
    """Histogram of s(x) with its mean marked."""
    values = np.asarray(dispersion, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    if values.size:
        ax.hist(values, bins=min(30, max(5, values.size // 5)), color="tab:blue", alpha=0.8)
        ax.axvline(values.mean(), color="black", linestyle="--", label=f"mean {values.mean():.3f}")
        ax.legend()
    else:
        _no_data(ax, "dispersion values")
    ax.set(xlabel="s(x)", ylabel="prompts", title=f"dispersion s(x), {values.size} prompts")
    return _save(fig, path)


def plot_lambda_control(matrices: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]], path: Path) -> Path:
    """One heatmap per run: rows the generation lambdas, columns the judges, cells the mean score (with the
    90% interval written in), the diagonal (a vertex's own judge) outlined."""
    fig = Figure(figsize=(6.0 * len(matrices), 0.6 * max(len(m) for m in matrices.values()) + 2.2))
    for ax, (title, matrix) in zip(fig.subplots(1, len(matrices), squeeze=False)[0], matrices.items()):
        rows = list(matrix)
        judges = list(next(iter(matrix.values())))
        means = np.array([[finite(matrix[r][j]["mean"]) or 0.0 for j in judges] for r in rows])
        ax.imshow(means, cmap="viridis", aspect="auto", vmin=0.0, vmax=1.0)
        for i, r in enumerate(rows):
            for k, j in enumerate(judges):
                cell = matrix[r][j]
                ax.text(k, i, f"{cell['mean']:.2f}\n[{cell['lo']:.2f}, {cell['hi']:.2f}]", ha="center", va="center",
                        color="white" if cell["mean"] < 0.6 else "black", fontsize=8)
                if r == j:
                    ax.add_patch(Rectangle((k - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
        ax.set_xticks(range(len(judges)), judges)
        ax.set_yticks(range(len(rows)), rows)
        ax.set(xlabel="judge", ylabel="lambda at generation", title=f"lambda control: {title}")
    return _save(fig, path)


def plot_scheduler(history: list[dict], path: Path) -> Path | None:
    """The learned scheduler's candidate probabilities p_j (`lambda/p_<j>`) over steps; None without them."""
    keys = sorted({k for h in history for k in h if k.startswith("lambda/p_")}, key=lambda k: int(k.rsplit("_", 1)[1]))
    if not keys:
        return None
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.subplots()
    for key in keys:
        steps, values = _series(history, key)
        ax.plot(steps, values, "-o", markersize=3, label=key.split("/", 1)[1])
    ax.set(xlabel="optimizer step", ylabel="probability", title="learned lambda scheduler: candidate probabilities")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, ncol=1 + len(keys) // 12)
    ax.grid(alpha=0.3)
    return _save(fig, path)
