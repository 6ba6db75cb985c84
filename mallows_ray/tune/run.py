"""`mallows-ray tune`: run (or resume) a sweep with Ray Tune and write its results.

`run_sweep` prepares the scored data once per data variant, builds the Tuner (search algorithm, ASHA, the
trial-end log) or restores an interrupted one from its experiment folder, checks that the run ended every
trial, and writes the results tables and best_config.yaml. `run_cli` is the command.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import yaml

from mallows_ray.config import Config
from mallows_ray.tune.config import (
    SweepConfig,
    SweepError,
    SweepSettings,
    expected_trials,
    load_sweep_config,
    sample_configs,
)
from mallows_ray.tune.results import SweepResult, best_config, best_row, trial_rows, write_tables
from mallows_ray.tune.trials import (
    TrialContext,
    ended_trials,
    finished_log_callback,
    max_concurrent_trials,
    run_trial,
    trial_name,
    variant_key,
)
from mallows_ray.typed_config import ConfigError, from_dict, load_yaml, to_dict


class SweepInterrupted(SweepError):
    """The sweep stopped before every trial ended (Ctrl+C, SIGUSR1, a lost driver); run it again to resume."""


def _prepare_scored_data(sweep: SweepConfig, address: str | None):
    """Prepare (or reuse) and check each distinct scored dataset once: {variant key: (folder, manifest)}.

    The variants are every combination of the listed values of the keys that change the scored data (all
    trials share one dataset when only loss/optim/... keys are swept)."""
    from mallows_ray.drivers.train import check_splits, make_plan, scored_data

    dims = [d for d in sweep.space if d.affects_preparation]
    scored = {}
    for combo in itertools.product(*(d.values for d in dims)):
        values = dict(zip([d.key for d in dims], combo))
        variant = variant_key(sweep, values)
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
            callbacks=[finished_log_callback(str(sweep.experiment_dir / "finished.jsonl"), settings.metric)],
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
    context = TrialContext(sweep, scored)
    # the trial function only waits on its Train controller (itself 0 CPUs): it takes no CPU from the workers.
    # Tune wants a non-empty resource bundle per trial, hence one byte of memory.
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context),
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
    rows = trial_rows(sweep, grid, context)
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
        print("mallows-ray tune: give the sweep YAML with --config (see jobs/configs/sweep_local.yaml)",
              file=sys.stderr)
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
