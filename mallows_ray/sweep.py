"""`mallows-ray tune`: a Ray Tune sweep over any training-config key, each trial a full `mallows-ray train` run.

A sweep YAML is an ordinary training config (model, data, loss, ...: the base every trial starts from) plus a
top-level `sweep:` section::

    sweep:
      name: beta-lr                # results under <storage_path>/<name>/
      storage_path: ~/mallows_ray_sweeps
      search: random               # grid (grid dimensions only) | random | optuna (pip install 'mallows-ray[optuna]')
      num_samples: 8               # trials drawn, each crossed with the grid dimensions; grid: repeats of the grid
      metric: eval/loss            # any metric the worker loop reports (loop.py): eval/loss, loss, ...
      mode: min
      scheduler: {name: asha, grace_period: 2, reduction_factor: 2, max_t: 16}   # or null: no early stopping
      space:                       # dotted training-config keys
        loss.beta: {grid: [0.05, 0.1, 0.5]}
        optim.lr: {loguniform: [1.0e-6, 1.0e-4]}
        model.lora: {choice: [null, {rank: 8, alpha: 16}]}   # a whole section as one value

How it runs (the Tune-over-Train pattern of Ray 2.5x+, not the deprecated `Tuner(trainer)`):

- The driver prepares the scored data once per distinct data config (keys under `data.` and the model's
  name/dtype change the scores, so they must be swept with grid/choice) and materializes it once into the
  object store; every trial streams the same blocks.
- Each trial is a small driver function (no CPU of its own) that builds the trial's `TorchTrainer` through
  `trainer.build_trainer`, the code of `mallows-ray train`, with Tune's `TuneReportCallback`: the workers'
  reports at eval/checkpoint steps (`run.eval_every`, `run.checkpoint_every`) are Tune's intermediate results,
  on which ASHA stops weak trials (time attribute: the optimizer `step`).
- Concurrency: trials that fit the cluster at once, from each trial's `scaling` (workers x CPUs/GPUs per
  worker), unless `max_concurrent_trials` is given.
- Trial names are deterministic (`<index>_<key>=<value>...`) and name the trial's Train run folder, so running
  the same command again resumes an interrupted sweep: finished trials are kept, unfinished ones continue from
  their last checkpoint.
- Output under <storage_path>/<name>/: results.csv and results.md (one row per trial), best_config.yaml (a
  training config `mallows-ray train --config` accepts), finished.jsonl (one line per trial as it ends), the
  trials' Train runs under runs/<trial name>/.
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import yaml

from mallows_ray.config import (
    Config, ConfigError, apply_override, bounded, changes_scored_data, from_dict, load_yaml, read_yaml_file, set_key,
    to_dict,
)

SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
_PER_TRIAL_KEYS = ("run", "run.name", "run.storage_path")  # set by the sweep for every trial
# final metrics shown in the results table besides the sweep's own metric (when the run reports them)
_TABLE_METRICS = ("step", "loss", "eval/loss", "eval/rewards/accuracy", "eval/rewards/margin")


class SweepError(RuntimeError):
    """A sweep cannot run or finish as configured; the message says what to change."""


class SweepInterrupted(SweepError):
    """The sweep stopped before every trial ended (Ctrl+C, SIGUSR1, a lost driver); run it again to resume."""


# ----------------------------------------------------------------------------------------------
# configuration


@dataclass
class SchedulerSettings:
    """ASHA (asynchronous successive halving): at each rung (grace_period x reduction_factor^k of `time_attr`)
    a trial whose metric is in the worse 1 - 1/reduction_factor of those that reached the rung stops."""

    name: Literal["asha"] = "asha"
    time_attr: str = "step"  # optimizer steps of the trial's reports; Tune's own: training_iteration
    grace_period: int = bounded(1, 1)
    reduction_factor: float = bounded(2.0, 1.01)
    max_t: int = bounded(100, 1)  # the last rung's horizon; trials are never cut at max_t itself


@dataclass
class SweepSettings:
    name: str = "sweep"
    storage_path: str = "~/mallows_ray_sweeps"  # a local folder; on a multi-node cluster a shared mount (NFS)
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = bounded(1, 1)
    seed: int = 0  # random and optuna sampling
    metric: str = "eval/loss"
    mode: Literal["min", "max"] = "min"
    scheduler: SchedulerSettings | None = None  # None: every trial runs to its end
    max_concurrent_trials: int | None = None  # None: as many as the cluster's CPUs/GPUs hold
    space: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Dimension:
    """One swept key: `values` are the listed values (grid, choice) or the bounds (uniform, loguniform, randint)."""

    key: str
    kind: str
    values: tuple

    @property
    def discrete(self) -> bool:
        return self.kind in ("grid", "choice")

    @property
    def affects_preparation(self) -> bool:
        """Whether the key changes the scored data: swept only over listed values, each prepared once."""
        return changes_scored_data(self.key)

    def tune_domain(self) -> Any:
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return getattr(tune, self.kind)(*self.values)  # uniform, loguniform, randint (high exclusive)


@dataclass(frozen=True)
class SweepConfig:
    settings: SweepSettings
    space: tuple[Dimension, ...]
    base: dict[str, Any]  # the training config sections as written; every trial applies its values on top

    @property
    def storage(self) -> Path:
        return Path(os.path.abspath(os.path.expanduser(self.settings.storage_path)))

    @property
    def experiment_dir(self) -> Path:
        """<storage_path>/<name>: Tune's experiment folder, the trials' runs and the results."""
        return self.storage / self.settings.name

    def to_mapping(self) -> dict[str, Any]:
        """The whole sweep YAML, as `load_sweep_config` reads it back."""
        return {"sweep": to_dict(self.settings), **copy.deepcopy(self.base)}

    def trial_data(self, values: dict[str, Any]) -> dict[str, Any]:
        """The base config with one trial's values applied (plain data, not yet validated)."""
        data = copy.deepcopy(self.base)
        for key, value in values.items():
            set_key(data, key, copy.deepcopy(value))
        return data


def _parse_dimension(key: str, spec: Any) -> Dimension:
    where = f"sweep.space.{key}"
    forms = "{grid: [v1, v2]}, {choice: [v1, v2]}, {uniform: [low, high]}, {loguniform: [low, high]}, " \
            "{randint: [low, high]} (high exclusive)"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
        raise ConfigError(f"{where}: {spec!r} is not a search dimension; expected one of {forms}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {kind} takes a non-empty list, got {values!r}")
    if kind in ("grid", "choice"):
        return Dimension(key, kind, tuple(values))
    number = int if kind == "randint" else (int, float)
    if len(values) != 2 or not all(isinstance(v, number) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}: {kind} takes [low, high] {'integers' if kind == 'randint' else 'numbers'}, "
                          f"got {values!r}")
    low, high = values
    if not low < high or (kind == "loguniform" and low <= 0):
        raise ConfigError(f"{where}: {kind} bounds {values!r} need low < high{' and low > 0' * (kind == 'loguniform')}")
    return Dimension(key, kind, (low, high))


def _check_dimension(dim: Dimension, search: str) -> None:
    where = f"sweep.space.{dim.key}"
    if dim.key in _PER_TRIAL_KEYS:
        raise ConfigError(f"{where}: the sweep sets run.name and run.storage_path for every trial; they cannot be swept")
    if search == "grid" and dim.kind != "grid":
        raise ConfigError(f"{where}: search: grid takes only {{grid: [...]}} dimensions, got {dim.kind}; "
                          "use search: random (or optuna) to sample")
    if search == "optuna" and dim.kind == "grid":
        raise ConfigError(f"{where}: optuna samples its trials and takes no grid; use {{choice: [...]}}")
    if dim.affects_preparation and not dim.discrete:
        raise ConfigError(f"{where}: this key changes the scored data, which is prepared once per value before the "
                          f"trials start; list its values with grid or choice instead of {dim.kind}")


def sample_configs(sweep: SweepConfig, limit: int = 4096) -> Iterator[tuple[dict[str, Any], Config]]:
    """(values, validated Config) for the trial configs worth checking before anything runs: every combination
    of the listed values and range bounds when there are at most `limit`, else each dimension on its own."""
    dims = sweep.space
    if math.prod(len(d.values) for d in dims) <= limit:  # values: the listed ones, or a range's two bounds
        combos = (dict(zip([d.key for d in dims], values)) for values in itertools.product(*(d.values for d in dims)))
    else:
        combos = ({d.key: v} for d in dims for v in d.values)
    for values in combos:
        try:
            yield values, from_dict(Config, sweep.trial_data(values))
        except ConfigError as err:
            where = ", ".join(f"sweep.space.{k}={v!r}" for k, v in values.items())
            raise ConfigError(f"{where}: {err}") from None


def load_sweep_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """Read a sweep YAML, apply `section.key=value` overrides (`sweep.num_samples=8` or `loss.beta=0.2`), and
    validate the sweep section, the base training config, and every swept key and value against the training
    config: an unknown key or a bad value raises `ConfigError` naming it."""
    data = read_yaml_file(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    for override in overrides:
        apply_override(data, override)
    if not isinstance(data.get("sweep"), dict):
        raise ConfigError(f"{path}: no `sweep:` section; a sweep YAML is a training config plus a sweep section "
                          "(name, search, metric, mode, scheduler, space)")
    settings = from_dict(SweepSettings, data.pop("sweep"), "sweep")
    if not settings.space:
        raise ConfigError("sweep.space: empty; give at least one dotted config key, e.g. loss.beta: {grid: [0.1, 0.5]}")
    if settings.search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError("sweep.search: optuna needs the optuna package: pip install 'mallows-ray[optuna]'")
    if settings.scheduler and settings.scheduler.grace_period > settings.scheduler.max_t:
        raise ConfigError(f"sweep.scheduler: grace_period {settings.scheduler.grace_period} exceeds max_t "
                          f"{settings.scheduler.max_t}")
    if "://" in settings.storage_path:
        raise ConfigError(f"sweep.storage_path: {settings.storage_path!r}: sweeps write to a local folder or a shared "
                          "mount (NFS) that every node sees; object-store URIs are not supported yet")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", settings.name):
        raise ConfigError(f"sweep.name: {settings.name!r} names a folder; use letters, digits, '.', '_', '-'")
    from_dict(Config, data)  # the base alone: its errors name the key without a sweep value in the way
    space = tuple(_parse_dimension(str(key), spec) for key, spec in settings.space.items())
    for dim in space:
        _check_dimension(dim, settings.search)
    sweep = SweepConfig(settings, space, data)
    for _ in sample_configs(sweep):
        pass
    return sweep


# ----------------------------------------------------------------------------------------------
# trials


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


def _short(value: Any) -> str:
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
    values = "_".join(f"{_key_label(key)}={_short(value)}" for key, value in sorted(trial.config.items()))
    return re.sub(r"[^A-Za-z0-9._=+,-]", "", f"{index}_{values}")[:96]


def _variant_key(sweep: SweepConfig, values: dict[str, Any]) -> str:
    """Which prepared dataset a trial uses: its values of the keys that change the scored data."""
    return json.dumps([values.get(d.key) for d in sweep.space if d.affects_preparation], sort_keys=True, default=str)


@dataclass(frozen=True)
class _TrialContext:
    """What every trial needs from the driver (small: the workers read the scored folders themselves)."""

    sweep: SweepConfig
    scored: dict[str, tuple[str, dict[str, Any]]]  # variant key -> (scored folder, its manifest)

    def trial_config(self, values: dict[str, Any], name: str) -> Config:
        data = self.sweep.trial_data(values)
        set_key(data, "data.train", self.scored[_variant_key(self.sweep, values)][0])
        set_key(data, "run.name", name)
        set_key(data, "run.storage_path", f"{self.sweep.experiment_dir}/runs")
        return from_dict(Config, data)

    def plan(self, values: dict[str, Any], name: str):
        from mallows_ray.data.pipeline import PreparedData
        from mallows_ray.train.trainer import make_plan

        folder, manifest = self.scored[_variant_key(self.sweep, values)]
        config = self.trial_config(values, name)
        return config, make_plan(config, PreparedData(Path(folder), manifest))


def _run_trial(values: dict[str, Any], *, context: _TrialContext) -> None:
    """One Tune trial: the trial's training run, built exactly as `mallows-ray train` builds it. The run is
    named after the trial, so a resumed sweep's unfinished trial continues from its last checkpoint."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mallows_ray.train.trainer import build_trainer

    config, plan = context.plan(values, tune.get_context().get_trial_name())
    trainer = build_trainer(config, plan, callbacks=[TuneReportCallback()])
    trainer.fit()  # raises TrainingFailedError after run.max_failures restarts: Tune marks the trial errored


def ended_trials(experiment: Path) -> set[str]:
    """Names of the trials that ended (completed, stopped early or errored), from <experiment>/finished.jsonl."""
    path = experiment / "finished.jsonl"
    return {json.loads(line)["trial"] for line in path.read_text().splitlines()} if path.exists() else set()


def _finished_log_callback(path: str, metric: str):
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


# ----------------------------------------------------------------------------------------------
# the driver


@dataclass(frozen=True)
class SweepResult:
    experiment_dir: str
    rows: list[dict[str, Any]]  # one per trial, in trial-name order (the results table)
    best: dict[str, Any]         # the best row
    best_config_path: str        # full training config of the best trial
    best_checkpoint: str | None  # its latest checkpoint folder

    @property
    def best_trial(self) -> str:
        return self.best["trial"]


def _prepare_scored_data(sweep: SweepConfig, address: str | None):
    """Prepare (or reuse) and check each distinct scored dataset once: {variant key: (folder, manifest)}.

    The variants are every combination of the listed values of the keys that change the scored data (all
    trials share one dataset when only loss/optim/... keys are swept)."""
    from mallows_ray.train.trainer import check_splits, make_plan, scored_data

    dims = [d for d in sweep.space if d.affects_preparation]
    scored = {}
    for combo in itertools.product(*(d.values for d in dims)):
        values = dict(zip([d.key for d in dims], combo))
        variant = _variant_key(sweep, values)
        config = from_dict(Config, sweep.trial_data(values))
        prepared = scored_data(config, address)
        plan = make_plan(config, prepared)  # checks the data against the loss and the batch settings now
        scored[variant] = (str(prepared.folder), prepared.manifest)
        check_splits(plan)
    return scored


def _search_algorithm(settings: SweepSettings, concurrency: int):
    """(search_alg, max_concurrent_trials for TuneConfig): Tune's basic generator takes the limit itself."""
    if settings.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch

            return OptunaSearch(seed=settings.seed), concurrency
        except ImportError as err:
            raise SweepError(f"sweep.search: optuna: {err}; pip install 'mallows-ray[optuna]'") from None
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=concurrency, random_state=settings.seed), None


def _tuner(sweep: SweepConfig, trainable: Any, concurrency: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    settings = sweep.settings
    scheduler = None
    if settings.scheduler is not None:
        s = settings.scheduler
        # stop_last_trials=False: a trial that reaches max_t still ends by itself (its final checkpoint and
        # export), never by Tune killing it at its last report
        scheduler = ASHAScheduler(time_attr=s.time_attr, grace_period=s.grace_period,
                                  reduction_factor=s.reduction_factor, max_t=s.max_t, stop_last_trials=False)
    search_alg, limit = _search_algorithm(settings, concurrency)
    return tune.Tuner(
        trainable,
        param_space={dim.key: dim.tune_domain() for dim in sweep.space},
        tune_config=tune.TuneConfig(
            metric=settings.metric, mode=settings.mode, search_alg=search_alg, scheduler=scheduler,
            num_samples=settings.num_samples, max_concurrent_trials=limit,
            trial_name_creator=trial_name, trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name=settings.name, storage_path=str(sweep.storage), verbose=1,
            callbacks=[_finished_log_callback(str(sweep.experiment_dir / "finished.jsonl"), settings.metric)],
        ),
    )


def _check_same_sweep(sweep: SweepConfig, saved_path: Path) -> None:
    saved = load_yaml(saved_path.read_text())
    current = sweep.to_mapping()
    if saved != current:
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        raise ConfigError(f"sweep {sweep.settings.name!r} in {sweep.experiment_dir} was started with a different "
                          f"config (sections that differ: {', '.join(changed)}); resuming it would mix trials of "
                          "two sweeps: give a new sweep.name, or delete that folder to start over")


def _checkpoint_path(result: Any) -> str | None:
    """The latest checkpoint a trial reported (its last report need not carry one)."""
    frame = result.metrics_dataframe
    if frame is None or "checkpoint_path" not in frame:
        return result.metrics.get("checkpoint_path")
    paths = frame["checkpoint_path"].dropna()
    return str(paths.iloc[-1]) if len(paths) else None


def _rows(sweep: SweepConfig, grid: Any, context: _TrialContext) -> list[dict[str, Any]]:
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
        for key in dict.fromkeys((metric, *_TABLE_METRICS)):
            row[key] = metrics.get(key)
        row["checkpoint"] = _checkpoint_path(result)
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial"])


def expected_trials(sweep: SweepConfig) -> int:
    """Trials of the whole sweep: num_samples, each a full pass over the grid dimensions when there are any."""
    return sweep.settings.num_samples * math.prod(len(d.values) for d in sweep.space if d.kind == "grid")


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
    return _short(value)


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


def run_sweep(sweep: SweepConfig, *, address: str | None = None) -> SweepResult:
    """Run (or resume) the sweep; write the results table and the best config; raise `SweepInterrupted` when
    it stopped before every trial ended (running it again resumes)."""
    import ray
    from ray import tune

    from mallows_ray.runtime import ensure_ray

    ensure_ray(address)
    configs = list(sample_configs(sweep))
    concurrency = sweep.settings.max_concurrent_trials or max_concurrent_trials(ray.cluster_resources(),
                                                                                [c for _, c in configs])
    # one prepared dataset per distinct data config among the trials (all listed values: data keys are discrete)
    scored = _prepare_scored_data(sweep, address)
    context = _TrialContext(sweep, scored)
    # the trial function only waits on its Train controller (itself 0 CPUs): it takes no CPU from the workers.
    # Tune wants a non-empty resource bundle per trial, hence one byte of memory.
    trainable = tune.with_resources(tune.with_parameters(_run_trial, context=context),
                                    {"cpu": 0, "memory": 1})
    experiment = sweep.experiment_dir
    saved = experiment / "sweep.yaml"
    if tune.Tuner.can_restore(experiment):
        if saved.is_file():
            _check_same_sweep(sweep, saved)
        print(f"[sweep] resuming {sweep.experiment_dir}: ended trials are kept, unfinished ones continue from "
              "their last checkpoint")
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        experiment.mkdir(parents=True, exist_ok=True)
        saved.write_text(yaml.safe_dump(sweep.to_mapping(), sort_keys=False))
        print(f"[sweep] {sweep.settings.name}: up to {concurrency} trial(s) at once -> {sweep.experiment_dir}")
        tuner = _tuner(sweep, trainable, concurrency)
    grid = tuner.fit()
    # Tune's ResultGrid does not tell an interrupted trial from an ended one (a restored trial's last result
    # lacks `done`): the log that Tune's trial-end hook writes does
    ended = ended_trials(experiment)
    if len(ended) < expected_trials(sweep):
        raise SweepInterrupted(f"sweep {sweep.settings.name!r} stopped with {len(ended)} of {expected_trials(sweep)} "
                               "trials ended; run the same command again to resume it")
    rows = _rows(sweep, grid, context)
    best = best_row(rows, sweep.settings.metric, sweep.settings.mode)
    write_tables(rows, experiment, best)
    best_path = experiment / "best_config.yaml"
    header = (f"# best trial {best['trial']} of sweep {sweep.settings.name} ({sweep.settings.metric} = "
              f"{best[sweep.settings.metric]:.6g}); train it with:\n#   mallows-ray train --config {best_path}\n")
    best_path.write_text(header + yaml.safe_dump(to_dict(best_config(sweep, best)), sort_keys=False))
    return SweepResult(str(experiment), rows, best, str(best_path), best["checkpoint"])


def run_cli(args: Any) -> int:
    """`mallows-ray tune`: load, run, print the table's path, the best trial, its config and checkpoint."""
    import sys

    if args.config is None:
        print("mallows-ray tune: give the sweep YAML with --config (see jobs/configs/sweep_local.yaml)", file=sys.stderr)
        return 2
    try:
        sweep = load_sweep_config(args.config, args.overrides)
        result = run_sweep(sweep, address=args.address)
    except ConfigError as err:
        print(f"mallows-ray tune: configuration error: {err}", file=sys.stderr)
        return 2
    except SweepInterrupted as err:
        print(f"mallows-ray tune: {err}", file=sys.stderr)
        return 130
    errors = sum(row["status"] == "error" for row in result.rows)
    print(Path(result.experiment_dir, "results.md").read_text())
    print(json.dumps({"results": f"{result.experiment_dir}/results.csv", "best_trial": result.best_trial,
                      sweep.settings.metric: result.best[sweep.settings.metric],
                      "best_config": result.best_config_path, "best_checkpoint": result.best_checkpoint,
                      "errored_trials": errors}, default=str))
    return 0
