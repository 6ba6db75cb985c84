"""A finished sweep's results: one row per trial, the best trial, results.csv / results.md and the best
trial's training config.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mallows_ray.config import Config
from mallows_ray.tune.config import SweepConfig, SweepError
from mallows_ray.tune.trials import TrialContext, short
from mallows_ray.typed_config import from_dict, set_key

# final metrics shown in the results table besides the sweep's own metric (when the run reports them)
TABLE_METRICS = ("step", "loss", "eval/loss", "eval/rewards/accuracy", "eval/rewards/margin")


@dataclass(frozen=True)
class SweepResult:
    """What `run_sweep` returns; the same figures are in the experiment folder's files."""

    experiment_dir: str
    rows: list[dict[str, Any]]  # one per trial, in trial-name order (the results table)
    best: dict[str, Any]         # the best row
    best_config_path: str        # full training config of the best trial
    best_checkpoint: str | None  # its latest checkpoint folder

    @property
    def best_trial(self) -> str:
        return self.best["trial"]


def _checkpoint_path(result: Any) -> str | None:
    """The latest checkpoint a trial reported (its last report need not carry one)."""
    frame = result.metrics_dataframe
    if frame is None or "checkpoint_path" not in frame:
        return result.metrics.get("checkpoint_path")
    paths = frame["checkpoint_path"].dropna()
    return str(paths.iloc[-1]) if len(paths) else None


def trial_rows(sweep: SweepConfig, grid: Any, context: TrialContext) -> list[dict[str, Any]]:
    """One row per trial of Tune's ResultGrid: its values, status (completed, early-stopped, error), final
    metrics and latest checkpoint, in trial-name order."""
    metric = sweep.settings.metric
    rows = []
    for result in grid:
        name = Path(result.path).name
        values, metrics = result.config, result.metrics or {}
        _, plan = context.plan(values, name)
        if result.error is not None:
            status = "error"
        else:  # Tune marks a trial stopped by ASHA as done too: its step tells it from a completed one
            status = "completed" if metrics.get("step") == plan.total_steps else "early-stopped"
        row = {"trial": name, **{dim.key: values.get(dim.key) for dim in sweep.space}, "status": status,
               "total_steps": plan.total_steps}
        for key in dict.fromkeys((metric, *TABLE_METRICS)):
            row[key] = metrics.get(key)
        row["checkpoint"] = _checkpoint_path(result)
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial"])


def best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any]:
    """The best trial by its last `metric`: among completed trials when any completed (an early-stopped
    trial's metric is from an earlier step), else among all that reported it."""
    def scored(candidates):
        return [r for r in candidates if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]

    candidates = scored(r for r in rows if r["status"] == "completed") or scored(rows)
    if not candidates:
        raise SweepError(f"no trial reported the metric {metric!r} (sweep.metric); eval/* metrics need data."
                         "validation; a trial's final metrics are in results.csv")
    pick = min if mode == "min" else max
    return pick(candidates, key=lambda r: r[metric])


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return short(value)


def write_tables(rows: list[dict[str, Any]], folder: Path, best: dict[str, Any]) -> None:
    """results.csv and results.md: one row per trial; the best trial is starred in the markdown."""
    columns = list(rows[0])
    with open(folder / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_cell(row[c]).replace("|", "\\|") for c in columns]
        if row is best:
            cells[0] = f"**{cells[0]}** (best)"
        lines.append("| " + " | ".join(cells) + " |")
    (folder / "results.md").write_text("\n".join(lines) + "\n")


def best_config(sweep: SweepConfig, best: dict[str, Any]) -> Config:
    """The base config with the best trial's values, as a fresh run `<sweep name>-best` in the base's storage."""
    data = sweep.trial_data({dim.key: best[dim.key] for dim in sweep.space})
    set_key(data, "run.name", f"{sweep.settings.name}-best")
    return from_dict(Config, data)
