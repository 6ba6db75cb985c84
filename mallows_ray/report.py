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
    lambda_control  optional, the main run's lambda-control matrix (`control.control_matrix`): lambda name ->
                    {judge: {"mean", "lo", "hi"}} of the replies generated under it
    results         optional, run name -> {"ranking": {vertex: {"top1", "pair"}}, "lambda_control": matrix,
                    "control_differences": (`control.control_differences`), "controlled": {objective: bool}}
                    for the base model, the trained policy and any ablations: the headline table and the
                    per-run sections (a missing part shows as n/a)
    extra           anything else worth keeping (command, config, timings), JSON-serialisable; shown last

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
from matplotlib.patches import Rectangle

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


def plot_lambda_control(matrices: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]], path: Path) -> Path:
    """One heatmap per run: rows the generation lambdas, columns the judges, cells the mean score (with the
    90% interval written in), the diagonal (a vertex's own judge) outlined."""
    fig = Figure(figsize=(6.0 * len(matrices), 0.6 * max(len(m) for m in matrices.values()) + 2.2))
    for ax, (title, matrix) in zip(fig.subplots(1, len(matrices), squeeze=False)[0], matrices.items()):
        rows = list(matrix)
        judges = list(next(iter(matrix.values())))
        means = np.array([[_finite(matrix[r][j]["mean"]) or 0.0 for j in judges] for r in rows])
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


def _interval_text(cell: Mapping[str, Any] | None) -> str:
    if not cell or _finite(cell.get("mean")) is None:
        return "n/a"
    return f"{cell['mean']:.3f} [{cell['lo']:.3f}, {cell['hi']:.3f}]"


def _matrix_table(matrix: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """Rows: generation lambdas; columns: judges; cells mean [90% interval]; the diagonal in bold."""
    judges = list(next(iter(matrix.values())))
    return _table(["lambda at generation", *judges],
                  [[name, *(f"**{_interval_text(cells[j])}**" if name == j else _interval_text(cells[j])
                            for j in judges)] for name, cells in matrix.items()])


def _closest_other(differences: Mapping[str, Mapping[str, float]]) -> Mapping[str, float] | None:
    """The difference to the other vertex that comes closest (smallest mean difference)."""
    return min(differences.values(), key=lambda d: d["mean"]) if differences else None


def _mean_over(ranking: Mapping[str, Mapping[str, float]], key: str) -> float | None:
    values = [_finite(v.get(key)) for v in ranking.values()]
    return float(np.mean(values)) if values and None not in values else None


def _headline(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The headline table: one column per run (base model first), rows = ranking and lambda-control figures."""
    names = list(results)
    vertices = list(dict.fromkeys(v for r in results.values() for v in (r.get("ranking") or {})))
    objectives = list(dict.fromkeys(k for r in results.values() for k in (r.get("control_differences") or {})))
    rows = [["top-1 ranking accuracy, mean over vertices", *(
                _number(_mean_over(results[n].get("ranking") or {}, "top1")) for n in names)],
            ["pair ranking accuracy, mean over vertices", *(
                _number(_mean_over(results[n].get("ranking") or {}, "pair")) for n in names)]]
    rows += [[f"top-1 under the {v} vertex", *(_number((results[n].get("ranking") or {}).get(v, {}).get("top1"))
                                                for n in names)] for v in vertices]
    rows += [[f"{k} judge: {k} vertex minus the closest other vertex", *(
        _interval_text(_closest_other((results[n].get("control_differences") or {}).get(k, {}))) for n in names)]
        for k in objectives]
    if objectives:
        rows.append(["objectives under lambda control", *(
            f"{sum(results[n]['controlled'].values())}/{len(results[n]['controlled'])}" if results[n].get("controlled")
            else "n/a" for n in names)])
    return [_table(["", *names], rows), "",
            "Ranking accuracy: on the test prompts, under each vertex lambda (rendered into the prompt), whether "
            "the policy's implicit rewards beta s(x) (log pi - log ref) put the reply that vertex's judge scores "
            "highest first (top-1) and order reply pairs as that judge does (pair). Lambda control: greedy replies "
            "to the test prompts generated under each vertex; an objective is under control when its vertex "
            "scores higher on its judge than every other vertex, with the 90% paired-bootstrap interval of each "
            "difference (over prompts) above 0. The base model column is the untrained policy.", ""]


def _summary_markdown(metrics: dict[str, Any], plots: dict[str, Path]) -> str:
    train, evals, final = metrics["train"], metrics["eval_history"], metrics["final_train"]
    parts = ["# Run report", ""]
    results = metrics.get("results") or {}
    if results:
        parts += ["## Headline (held-out test prompts)", "", *_headline(results)]
    control_runs = {name: r for name, r in results.items() if r.get("lambda_control")}
    if not control_runs and metrics["lambda_control"]:
        control_runs = {"trained": {"lambda_control": metrics["lambda_control"]}}
    if control_runs:
        parts += ["## Lambda control", "", "Mean judge score of the replies generated under each lambda, with the "
                  "90% bootstrap interval over test prompts; the diagonal (a vertex on its own judge) in bold.", ""]
        for name, run in control_runs.items():
            parts += [f"### {name}", "", _matrix_table(run["lambda_control"]), ""]
            differences = run.get("control_differences") or {}
            if differences:
                parts += ["Paired differences on each objective's judge, its vertex minus each other vertex:", "",
                          _table(["judge", "vertex minus", "difference [90% interval]"],
                                 [[k, j, _interval_text(d)] for k, others in differences.items()
                                  for j, d in others.items()]), ""]
        if "lambda_control" in plots:
            parts += ["![lambda_control](lambda_control.png)", ""]
    ranked = {name: r["ranking"] for name, r in results.items() if r.get("ranking")}
    if ranked:
        vertices = list(dict.fromkeys(v for r in ranked.values() for v in r))
        parts += ["## Ranking accuracy per vertex", "", _table(
            ["vertex", *(f"{name} {key}" for name in ranked for key in ("top-1", "pair"))],
            [[v, *(_number(r.get(v, {}).get(key)) for r in ranked.values() for key in ("top1", "pair"))]
             for v in vertices]), ""]
    if "scheduler" in plots:
        parts += ["## Learned lambda scheduler", "", "![scheduler](scheduler.png)", ""]
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
    parts += ["## Plots", ""] + [f"![{name}]({path.name})" for name, path in plots.items()] + [""]
    if metrics["extra"]:  # the config and run details last
        scalars = {k: v for k, v in metrics["extra"].items() if not isinstance(v, (dict, list))}
        nested = {k: v for k, v in metrics["extra"].items() if isinstance(v, (dict, list))}
        parts += ["## Run", ""]
        if scalars:
            parts += [_table(["key", "value"], [[k, _number(v) if not isinstance(v, str) else v]
                                                for k, v in scalars.items()]), ""]
        for key, value in nested.items():  # config, timings, samples: readable as YAML, not one JSON line
            parts += [f"### {key}", "", "```yaml",
                      yaml.safe_dump(value, sort_keys=False, allow_unicode=True, width=110).rstrip(), "```", ""]
    return "\n".join(parts).rstrip("\n") + "\n"


def write_report(
    folder: str | Path,
    *,
    history: list[dict],
    eval_metrics: dict,
    dispersion: Sequence[float] | np.ndarray,
    win_rates: dict | None,
    lambda_control: dict | None,
    extra: dict,
    results: dict | None = None,
    generation_lambdas: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write metrics.json, summary.md and the plots into `folder` (created); returns {artifact: path}.

    Artifacts: `metrics` (metrics.json: train, eval_history, final_train, eval, dispersion summary,
    win_rates, lambda_control, generation_lambdas, results, extra), `summary` (summary.md: the headline
    table first, the run details last), `loss` (loss over steps), `rewards` (reward accuracy and margin over
    steps), `dispersion` (histogram of s(x)), `lambda_control` (heatmaps of every run's matrix) when a matrix
    is given, and `scheduler` (the learned scheduler's candidate probabilities) when the history logs them.
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
        "generation_lambdas": list(generation_lambdas or (lambda_control or {})),
        "results": results or {},
        "extra": extra,
    })
    plots = {
        "loss": plot_curves(history, ["loss"], folder / "loss.png"),
        "rewards": plot_curves(history, ["accuracy", "margin"], folder / "rewards.png"),
        "dispersion": plot_dispersion(dispersion, folder / "dispersion.png"),
    }
    matrices = {name: r["lambda_control"] for name, r in (results or {}).items() if r.get("lambda_control")}
    if not matrices and lambda_control:
        matrices = {"trained": lambda_control}
    if matrices:
        plots["lambda_control"] = plot_lambda_control(matrices, folder / "lambda_control.png")
    scheduler = plot_scheduler(history, folder / "scheduler.png")
    if scheduler is not None:
        plots["scheduler"] = scheduler
    paths = {"metrics": folder / "metrics.json", "summary": folder / "summary.md", **plots}
    paths["metrics"].write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    paths["summary"].write_text(_summary_markdown(metrics, plots))
    return paths
