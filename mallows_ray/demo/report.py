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

The plots are drawn by plots.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mallows_ray.demo.plots import CURVES, finite, plot_curves, plot_dispersion, plot_lambda_control, plot_scheduler

PERCENTILES = (5, 50, 95)


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
        return finite(value)
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


def _number(value: Any) -> str:
    number = finite(value)
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
    if not cell or finite(cell.get("mean")) is None:
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
    values = [finite(v.get(key)) for v in ranking.values()]
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
    train = [h for h in history if finite(h.get("loss")) is not None]
    metrics = _jsonable({
        "train": train,
        "eval_history": [h for h in history if finite(h.get("eval/loss")) is not None],
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
