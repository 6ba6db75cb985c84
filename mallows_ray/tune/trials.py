"""The trials: how many run at once, their names, and the function each one runs.

A trial is a small driver function (no CPU of its own) that builds the trial's `TorchTrainer` with
`drivers.train.build_trainer`, the code of `mallows-ray train`, plus Tune's `TuneReportCallback`; its run is
named after the trial, so a resumed sweep's unfinished trial continues from its last checkpoint. Trials of one
data variant (the values of the keys that change the scored data) share one prepared dataset.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mallows_ray.config import Config
from mallows_ray.tune.config import SweepConfig, SweepError
from mallows_ray.typed_config import from_dict, set_key


def max_concurrent_trials(cluster: dict[str, float], configs: list[Config]) -> int:
    """How many trials fit the cluster at once: its CPUs (and GPUs) over the largest trial's need."""
    limits = []
    cpus = max(c.scaling.num_workers * c.scaling.cpus_per_worker for c in configs)
    if cpus > 0:
        limits.append(int(cluster.get("CPU", 0.0) / cpus + 1e-9))
    gpu_configs = [c for c in configs if c.scaling.use_gpu]
    if gpu_configs:
        gpus = max(c.scaling.num_workers * c.scaling.gpus_per_worker for c in gpu_configs)
        if gpus > 0:
            limits.append(int(cluster.get("GPU", 0.0) / gpus + 1e-9))
    count = min(limits) if limits else 1
    if count < 1:
        raise SweepError(f"one trial needs {cpus:g} CPUs{f' and {gpus:g} GPUs' if gpu_configs else ''} (scaling."
                         f"num_workers x cpus/gpus_per_worker) but the cluster has {cluster.get('CPU', 0):g} CPUs "
                         f"and {cluster.get('GPU', 0):g} GPUs")
    return count


def short(value: Any) -> str:
    """A value as trial names and the results table show it: floats to 4 significant digits, sections as
    compact JSON."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def _key_label(key: str) -> str:
    """The leaf of a dotted key; a key through a list keeps the path below its section (`terms.1.weight`),
    so the terms of a composite loss stay apart."""
    rest = key.partition(".")[2]
    return rest if any(part.isdigit() for part in key.split(".")) else key.rsplit(".", 1)[-1]


def trial_name(trial: Any) -> str:
    """`<index>_<leaf>=<value>_...`: grid and random trials are numbered in generation order (Tune's trial id
    ends with that counter), so an interrupted sweep names them alike when it runs again; optuna's trial ids
    are random and stand in for the index."""
    index = trial.trial_id.rsplit("_", 1)[-1]
    values = "_".join(f"{_key_label(key)}={short(value)}" for key, value in sorted(trial.config.items()))
    return re.sub(r"[^A-Za-z0-9._=+,-]", "", f"{index}_{values}")[:96]


def variant_key(sweep: SweepConfig, values: dict[str, Any]) -> str:
    """Which prepared dataset a trial uses: its values of the keys that change the scored data."""
    return json.dumps([values.get(d.key) for d in sweep.space if d.affects_preparation], sort_keys=True, default=str)


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs from the driver (small: the workers read the scored folders themselves)."""

    sweep: SweepConfig
    scored: dict[str, tuple[str, dict[str, Any]]]  # variant key -> (scored folder, its manifest)

    def trial_config(self, values: dict[str, Any], name: str) -> Config:
        data = self.sweep.trial_data(values)
        set_key(data, "data.train", self.scored[variant_key(self.sweep, values)][0])
        set_key(data, "run.name", name)
        set_key(data, "run.storage_path", f"{self.sweep.experiment_dir}/runs")
        config = from_dict(Config, data)
        if config.scaling.threads_per_worker == 0:  # trials run side by side: each worker its reserved CPUs
            config.scaling.threads_per_worker = max(1, int(config.scaling.cpus_per_worker))
        return config

    def plan(self, values: dict[str, Any], name: str):
        from mallows_ray.data.cache import PreparedData
        from mallows_ray.drivers.train import make_plan

        folder, manifest = self.scored[variant_key(self.sweep, values)]
        config = self.trial_config(values, name)
        return config, make_plan(config, PreparedData(Path(folder), manifest))


def run_trial(values: dict[str, Any], *, context: TrialContext) -> None:
    """One Tune trial: the trial's training run, built exactly as `mallows-ray train` builds it. The run is
    named after the trial, so a resumed sweep's unfinished trial continues from its last checkpoint."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mallows_ray.drivers.train import build_trainer

    config, plan = context.plan(values, tune.get_context().get_trial_name())
    trainer = build_trainer(config, plan, callbacks=[TuneReportCallback()])
    trainer.fit()  # raises TrainingFailedError after run.max_failures restarts: Tune marks the trial errored


def ended_trials(experiment: Path) -> set[str]:
    """Names of the trials that ended (completed, stopped early or errored), from <experiment>/finished.jsonl."""
    path = experiment / "finished.jsonl"
    return {json.loads(line)["trial"] for line in path.read_text().splitlines()} if path.exists() else set()


def finished_log_callback(path: str, metric: str):
    """A Tune callback writing <experiment>/finished.jsonl, which `ended_trials` reads back."""
    from ray import tune

    class FinishedLog(tune.Callback):
        """Appends one line per trial as it ends, completed, stopped early or errored: `tail -f` a long sweep."""

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._write(trial, error=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._write(trial, error=True)

        def _write(self, trial, *, error: bool) -> None:
            result = trial.last_result or {}
            line = {"trial": str(trial), "step": result.get("step"), metric: result.get(metric), "error": error}
            with open(path, "a") as fh:
                fh.write(json.dumps(line) + "\n")

    return FinishedLog()
