"""The demo's report folder: metrics.json, summary.md and PNG plots, from results handed in by the caller.

Nothing here trains, evaluates or starts Ray: the demo runs those stages and passes their outputs to
`write_report`, so the report can be rebuilt (or tested) from plain Python values.

Inputs (see `write_report`):
    history         rank 0's metric dicts per log step (`TrainResult.history`, train/loop.py): `step`, `loss`,
                    `rewards/accuracy`, `rewards/margin`, ..., and on evaluation steps `eval/loss`,
                    `eval/rewards/accuracy`, `eval/rewards/margin`
    eval_metrics    final figures, name -> number (e.g. the test split's `eval/*` metrics)
    dispersion      s(x) per prompt of the scored data (MallowsPO's dispersion, ALGORITHMS.md)
    win_rates       optional, name -> rate, or name -> {column: value} (e.g. per judge)
    lambda_control  optional, lambda label -> {objective: mean judge score} of replies generated under it
    extra           anything else worth keeping (command, config, timings), JSON-serialisable

Plots use matplotlib's object API with the Agg canvas (no pyplot state, no display needed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# (train key, eval key, axis label) of the curves plotted over steps.
CURVES = {
    "loss": ("loss", "eval/loss", "loss"),
    "accuracy": ("rewards/accuracy", "eval/rewards/accuracy", "reward accuracy"),
    "margin": ("rewards/margin", "eval/rewards/margin", "reward margin"),
}
PERCENTILES = (5, 50, 95)


def _finite(value: Any) -> float | None:
    """A float, or None for a missing, non-numeric or non-finite value (JSON has no NaN)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _jsonable(value: Any) -> Any:
    """`value` with numpy scalars/arrays, tuples and paths made JSON-native and NaN/inf turned into null."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _finite(value)
    if value is None or isinstance(value, str):
        return value
    return str(value)


def dispersion_summary(dispersion: Sequence[float] | np.ndarray) -> dict[str, float | int | None]:
    """count, mean, std, min, p5, median, p95, max of s(x) over its finite values (None when there are none)."""
    values = np.asarray(dispersion, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"count": 0, "mean": None, "std": None, "min": None, "p5": None, "median": None, "p95": None,
                "max": None}
    p5, median, p95 = np.percentile(values, PERCENTILES)
    return {"count": int(values.size), "mean": float(values.mean()), "std": float(values.std()),
            "min": float(values.min()), "p5": float(p5), "median": float(median), "p95": float(p95),
            "max": float(values.max())}


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the history entries that carry a finite `key`."""
    points = [(_finite(h.get("step")), _finite(h.get(key))) for h in history]
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


def plot_lambda_control(lambda_control: Mapping[str, Mapping[str, float]], path: Path) -> Path:
    """Grouped bars: one group per lambda, one bar per objective (its mean judge score)."""
    labels = list(lambda_control)
    objectives = sorted({name for scores in lambda_control.values() for name in scores})
    fig = Figure(figsize=(max(5.5, 1.6 * len(labels) + 2), 3.8))
    ax = fig.subplots()
    width = 0.8 / max(len(objectives), 1)
    x = np.arange(len(labels))
    for k, name in enumerate(objectives):
        heights = [_finite(lambda_control[label].get(name)) or 0.0 for label in labels]
        ax.bar(x + (k - (len(objectives) - 1) / 2) * width, heights, width, label=name)
    ax.set_xticks(x, labels, rotation=20, ha="right")
    ax.set(ylabel="mean judge score", title="judge scores per lambda")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never over them
    return _save(fig, path)


def _number(value: Any) -> str:
    number = _finite(value)
    if number is None:
        return "n/a"
    return f"{int(number)}" if number.is_integer() and abs(number) >= 1 else f"{number:.4g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _mapping_table(data: Mapping[str, Any], first: str) -> str:
    """name -> number as a 2-column table; name -> {column: number} as one column per inner key."""
    if all(isinstance(v, Mapping) for v in data.values()):
        columns = sorted({c for v in data.values() for c in v})
        return _table([first, *columns], [[name, *(_number(v.get(c)) for c in columns)] for name, v in data.items()])
    return _table([first, "value"], [[name, _number(v) if not isinstance(v, str) else v] for name, v in data.items()])


def _summary_markdown(metrics: dict[str, Any], plots: dict[str, Path]) -> str:
    train, evals, final = metrics["train"], metrics["eval_history"], metrics["final_train"]
    parts = ["# Run report", ""]
    if metrics["extra"]:
        scalars = {k: v for k, v in metrics["extra"].items() if not isinstance(v, (dict, list))}
        nested = {k: v for k, v in metrics["extra"].items() if isinstance(v, (dict, list))}
        parts += ["## Run", ""]
        if scalars:
            parts += [_table(["key", "value"], [[k, _number(v) if not isinstance(v, str) else v]
                                                for k, v in scalars.items()]), ""]
        for key, value in nested.items():  # config, timings, samples: readable as YAML, not one JSON line
            parts += [f"### {key}", "", "```yaml",
                      yaml.safe_dump(value, sort_keys=False, allow_unicode=True, width=110).rstrip(), "```", ""]
    parts += ["## Training", ""]
    if final:
        first = train[0] if train else {}
        rows = [[label, _number(first.get(key)), _number(final.get(key))] for key, _, label in CURVES.values()]
        parts += [f"{len(train)} logged steps, last step {_number(final.get('step'))}.", "",
                  _table(["metric", "first logged step", "last logged step"], rows), ""]
    else:
        parts += ["No training steps were logged.", ""]
    if evals:
        parts += ["Evaluations during training:", "", _table(
            ["step", "eval loss", "eval accuracy", "eval margin"],
            [[_number(e.get("step")), *(_number(e.get(CURVES[n][1])) for n in CURVES)] for e in evals]), ""]
    if metrics["eval"]:
        parts += ["## Final evaluation", "", _mapping_table(metrics["eval"], "metric"), ""]
    d = metrics["dispersion"]
    parts += ["## Dispersion s(x)", "", _table(["count", "mean", "std", "min", "p5", "median", "p95", "max"],
                                                [[_number(d[k]) for k in d]]), ""]
    if metrics["win_rates"]:
        parts += ["## Win rates", "", _mapping_table(metrics["win_rates"], "comparison"), ""]
    if metrics["lambda_control"]:
        parts += ["## Judge scores per lambda", "", _mapping_table(metrics["lambda_control"], "lambda"), ""]
    parts += ["## Plots", ""] + [f"![{name}]({path.name})" for name, path in plots.items()]
    return "\n".join(parts) + "\n"


def write_report(
    folder: str | Path,
    *,
    history: list[dict],
    eval_metrics: dict,
    dispersion: Sequence[float] | np.ndarray,
    win_rates: dict | None,
    lambda_control: dict | None,
    extra: dict,
) -> dict[str, Path]:
    """Write metrics.json, summary.md and the plots into `folder` (created); returns {artifact: path}.

    Artifacts: `metrics` (metrics.json: train, eval_history, final_train, eval, dispersion summary,
    win_rates, lambda_control, extra), `summary` (summary.md), `loss` (loss over steps), `rewards` (reward
    accuracy and margin over steps), `dispersion` (histogram of s(x)), and `lambda_control` (bars) when
    lambda_control is given. Plots show train values as lines and evaluation steps as markers.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train = [h for h in history if _finite(h.get("loss")) is not None]
    metrics = _jsonable({
        "train": train,
        "eval_history": [h for h in history if _finite(h.get("eval/loss")) is not None],
        "final_train": train[-1] if train else {},
        "eval": eval_metrics,
        "dispersion": dispersion_summary(dispersion),
        "win_rates": win_rates,
        "lambda_control": lambda_control,
        "extra": extra,
    })
    plots = {
        "loss": plot_curves(history, ["loss"], folder / "loss.png"),
        "rewards": plot_curves(history, ["accuracy", "margin"], folder / "rewards.png"),
        "dispersion": plot_dispersion(dispersion, folder / "dispersion.png"),
    }
    if lambda_control:
        plots["lambda_control"] = plot_lambda_control(lambda_control, folder / "lambda_control.png")
    paths = {"metrics": folder / "metrics.json", "summary": folder / "summary.md", **plots}
    paths["metrics"].write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    paths["summary"].write_text(_summary_markdown(metrics, plots))
    return paths
