"""The bandit's method x beta grid as a Ray Tune sweep, one Tune trial per point (Ray is imported on call).

Each trial calls the pure `training.run_trial(config)` on the plain dict Tune passes and reports its row; the
driver collects the rows in grid order, so a sweep gives exactly the numbers of the in-process
`training.run_experiment`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mallows_ray.bandit.config import BanditConfig
from mallows_ray.bandit.training import ROW_KEYS, run_trial
from mallows_ray.runtime import ensure_ray
from mallows_ray.typed_config import to_dict


def _trainable(config: dict[str, Any]) -> None:
    from ray import tune

    tune.report(run_trial(config))


def bandit_sweep(cfg: BanditConfig, storage_path: str | Path, *, address: str | None = None) -> list[dict[str, Any]]:
    """Run every (method, beta) of `cfg` as a Tune trial (1 CPU each); rows in methods x betas order."""
    from ray import tune

    ensure_ray(address)
    # Tune hands each trial a plain dict: the config's keys with one (method, beta) in place of the grid's lists
    space = {k: v for k, v in to_dict(cfg).items() if k not in ("methods", "betas")}
    space.update(method=tune.grid_search(list(cfg.methods)), beta=tune.grid_search(list(cfg.betas)))
    tuner = tune.Tuner(
        tune.with_resources(_trainable, {"cpu": 1}),
        param_space=space,
        tune_config=tune.TuneConfig(metric="reward", mode="max"),
        run_config=tune.RunConfig(name="mallows-bandit", storage_path=str(Path(storage_path).resolve()), verbose=0),
    )
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} bandit trial(s) failed; first: {errors[0]}")
    # Tune adds its own bookkeeping keys to the metrics: keep the trial's row only
    rows = {(r.metrics["method"], float(r.metrics["beta"])): {k: r.metrics[k] for k in ROW_KEYS} for r in grid}
    return [rows[(m, b)] for m in cfg.methods for b in cfg.betas]
