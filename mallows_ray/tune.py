"""Ray Tune sweeps. For now: the Mallows bandit's method x beta grid, one Tune trial per point.

Each trial calls the pure `bandit.run_trial(config)` and reports its row; the driver collects the rows in
grid order, so a sweep gives exactly the numbers of the in-process `bandit.run_experiment`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mallows_ray import bandit
from mallows_ray.runtime import ensure_ray


def _bandit_trainable(config: dict[str, Any]) -> None:
    from ray import tune

    tune.report(bandit.run_trial(config))


def bandit_sweep(config: dict[str, Any], storage_path: str | Path, *, address: str | None = None) -> list[dict[str, Any]]:
    """Run every (method, beta) of `config` as a Tune trial (1 CPU each); rows in methods x betas order."""
    from ray import tune

    cfg = bandit.resolve_config(config)
    ensure_ray(address)
    space = {k: v for k, v in cfg.items() if k not in ("methods", "betas")}
    space.update(method=tune.grid_search(list(cfg["methods"])), beta=tune.grid_search([float(b) for b in cfg["betas"]]))
    tuner = tune.Tuner(
        tune.with_resources(_bandit_trainable, {"cpu": 1}),
        param_space=space,
        tune_config=tune.TuneConfig(metric="reward", mode="max"),
        run_config=tune.RunConfig(name="mallows-bandit", storage_path=str(Path(storage_path).resolve()), verbose=0),
    )
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} bandit trial(s) failed; first: {errors[0]}")
    # Tune adds its own bookkeeping keys to the metrics: keep the trial's row only
    rows = {(r.metrics["method"], float(r.metrics["beta"])): {k: r.metrics[k] for k in bandit.ROW_KEYS} for r in grid}
    return [rows[(m, float(b))] for m in cfg["methods"] for b in cfg["betas"]]
