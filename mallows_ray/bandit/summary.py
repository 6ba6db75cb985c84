"""The bandit's results: gap to the frontier, reward at matched KL, and the files a run writes.

Summary (`summarize`): per method, the mean gap to the frontier at its own points (frontier reward at the point's
KL minus its reward), and against DPO at matched KL: both methods' (KL, reward) points, sorted by KL, are joined
piecewise-linearly; over the KL window both curves cover, the mean of (reward_method - reward_dpo) on 101 evenly
spaced KLs ("reward at matched KL"), and the share of DPO's frontier gap that the method closes there.
`write_outputs` writes CSV, markdown, JSON and a PNG plot of the rows.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from mallows_ray.bandit.config import BanditConfig
from mallows_ray.bandit.problem import BanditProblem, frontier_reward_at
from mallows_ray.bandit.training import ROW_KEYS


def _curve(rows: Iterable[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    pts = sorted((float(r["kl"]), float(r["reward"])) for r in rows)
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def summarize(rows: Sequence[dict[str, Any]], frontier_curve: tuple[Any, Any],
              baseline: str = "dpo") -> dict[str, dict[str, Any]]:
    """Per method: mean frontier gap at its points, and reward at matched KL against `baseline` (module doc).

    matched-KL fields (None when the KL ranges do not overlap or the method is the baseline): kl_window,
    reward_vs_baseline = mean over the window of reward_method(KL) - reward_baseline(KL) (curves joined
    piecewise-linearly through the points sorted by KL), gap_in_window / baseline_gap_in_window = mean frontier
    gap there, gap_closed = 1 - gap_in_window / baseline_gap_in_window.
    """
    methods = list(dict.fromkeys(r["method"] for r in rows))
    base_kl, base_reward = _curve(r for r in rows if r["method"] == baseline) if baseline in methods else (None, None)
    out: dict[str, dict[str, Any]] = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        kl, reward = _curve(mine)
        gaps = frontier_reward_at(kl, frontier_curve) - reward
        entry: dict[str, Any] = {
            "points": len(mine), "kl_min": float(kl.min()), "kl_max": float(kl.max()),
            "reward_max": float(reward.max()), "mean_frontier_gap": float(gaps.mean()),
            "kl_window": None, "reward_vs_baseline": None, "gap_in_window": None, "baseline_gap_in_window": None,
            "gap_closed": None,
        }
        if base_kl is not None and method != baseline:
            lo, hi = max(kl.min(), base_kl.min()), min(kl.max(), base_kl.max())
            if hi > lo:
                grid = np.linspace(lo, hi, 101)
                mine_r, base_r = np.interp(grid, kl, reward), np.interp(grid, base_kl, base_reward)
                best = frontier_reward_at(grid, frontier_curve)
                gap, base_gap = float((best - mine_r).mean()), float((best - base_r).mean())
                entry.update(kl_window=[float(lo), float(hi)], reward_vs_baseline=float((mine_r - base_r).mean()),
                             gap_in_window=gap, baseline_gap_in_window=base_gap,
                             gap_closed=(1.0 - gap / base_gap) if base_gap > 1e-12 else None)
        out[method] = entry
    return out


def summary_text(summary: dict[str, dict[str, Any]], baseline: str = "dpo") -> str:
    lines = []
    for method, e in summary.items():
        line = (f"- {method}: KL {e['kl_min']:.3f}-{e['kl_max']:.3f} nats, best reward {e['reward_max']:.4f}, "
                f"mean gap to the frontier {e['mean_frontier_gap']:.4f}")
        if e["reward_vs_baseline"] is not None:
            lo, hi = e["kl_window"]
            closed = "" if e["gap_closed"] is None else f", closing {100 * e['gap_closed']:.0f}% of {baseline}'s gap"
            line += (f"; at matched KL in [{lo:.3f}, {hi:.3f}] it earns {e['reward_vs_baseline']:+.4f} reward vs "
                     f"{baseline} (gap to frontier {e['gap_in_window']:.4f} vs {e['baseline_gap_in_window']:.4f}"
                     f"{closed})")
        lines.append(line + ".")
    return "\n".join(lines)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the rows."""
    head = "| method | beta | reward | KL | frontier reward at KL | gap | final loss | pair acc | steps | seconds |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['method']} | {r['beta']:g} | {r['reward']:.4f} | {r['kl']:.4f} | "
                     f"{r['frontier_reward']:.4f} | {r['frontier_gap']:.4f} | {r['final_loss']:.4f} | "
                     f"{r['pair_accuracy']:.3f} | {r['steps']} | {r['seconds']:.2f} |")
    return "\n".join(lines)


def describe_problem(problem: BanditProblem, cfg: BanditConfig) -> str:
    """One paragraph: the contexts, dispersions, data and optimiser of a run (the notes atop results.md)."""
    fmt = lambda a: "[" + ", ".join(f"{v:.3f}" for v in a) + "]"  # noqa: E731
    data = ("exact pair probabilities (population limit)" if cfg.population else
            f"{int(problem.pair_weight.sum())} sampled preference pairs ({cfg.pairs_per_context} per context, "
            f"seed {cfg.seed})")
    return (f"{len(problem.phis)} contexts x {problem.rewards.shape[1]} arms, rewards `{cfg.rewards}`, reference "
            f"`{cfg.reference}`; phi(x) = {fmt(problem.phis)}, s(x) = {fmt(problem.s_true)}, noisy s_hat(x) = "
            f"{fmt(problem.s_noisy)} (sigma {cfg.noise_sigma}); {data}; full-batch {cfg.optimizer} lr "
            f"{cfg.lr}, {cfg.steps} steps.")


def write_outputs(rows: Sequence[dict[str, Any]], frontier_curve: tuple[Any, Any], out_dir: str | Path, *,
                  notes: str | None = None) -> dict[str, Path]:
    """Write results.csv, frontier.csv, results.md (table + summary), summary.json and frontier.png to out_dir.

    Returns {kind: path}. Without matplotlib (not a dependency of the package) the text outputs are written, a
    warning is issued and "png" is absent from the result.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "results.csv", "frontier_csv": out / "frontier.csv", "markdown": out / "results.md",
             "summary": out / "summary.json", "png": out / "frontier.png"}
    with paths["csv"].open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(ROW_KEYS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    f_kl, f_reward = (np.asarray(a, dtype=np.float64) for a in frontier_curve)
    order = np.argsort(f_kl, kind="stable")
    with paths["frontier_csv"].open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["kl", "reward"])
        writer.writerows([[f"{f_kl[i]:.8g}", f"{f_reward[i]:.8g}"] for i in order])
    summary = summarize(rows, frontier_curve)
    paths["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    md = ["# Mallows bandit: reward vs KL", ""]
    if notes:
        md += [notes, ""]
    md += [format_table(rows), "", "## Summary", "",
           "Gap = frontier reward at the point's KL minus its reward (0 = optimal). Matched KL: each method's "
           "points joined piecewise-linearly in KL order, averaged over the KL window it shares with dpo.", "",
           summary_text(summary), ""]
    paths["markdown"].write_text("\n".join(md))
    if not _plot(rows, f_kl[order], f_reward[order], paths["png"]):
        warnings.warn("matplotlib is not installed: frontier.png not written (pip install matplotlib)", stacklevel=2)
        del paths["png"]
    return paths


def _plot(rows: Sequence[dict[str, Any]], f_kl: np.ndarray, f_reward: np.ndarray, path: Path) -> bool:
    """Every method's (KL, reward) points, joined in KL order, over the frontier (sorted by KL); False without
    matplotlib, which is imported here only (Agg canvas, no pyplot: the global backend is left alone)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(7.5, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(f_kl, f_reward, color="black", linewidth=2, label="optimal frontier")
    markers = "osD^vP*X"
    for k, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["kl"])
        ax.plot([r["kl"] for r in mine], [r["reward"] for r in mine], marker=markers[k % len(markers)],
                linewidth=1, markersize=5, label=method)
    ax.set_xlabel("KL(pi || pi_ref), nats (mean over contexts)")
    ax.set_ylabel("expected reward")
    ax.set_title("Mallows bandit: reward-KL trade-off over the beta grid")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return True
