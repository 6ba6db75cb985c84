"""`mallows-ray tune`: a Ray Tune sweep over any training-config key, each trial a full `mallows-ray train` run.

A sweep YAML is an ordinary training config (model, data, loss, ...: the base every trial starts from) plus a
top-level `sweep:` section::

    sweep:
      name: beta-lr                # results under <storage_path>/<name>/
      storage_path: ~/mallows_ray_sweeps
      search: random               # grid (grid dimensions only) | random | optuna (pip install 'mallows-ray[optuna]')
      num_samples: 8               # trials drawn, each crossed with the grid dimensions; grid: repeats of the grid
      metric: eval/loss            # any metric the worker loop reports (train/loop.py): eval/loss, loss, ...
      mode: min
      scheduler: {name: asha, grace_period: 2, reduction_factor: 2, max_t: 16}   # or null: no early stopping
      space:                       # dotted training-config keys
        loss.beta: {grid: [0.05, 0.1, 0.5]}
        optim.lr: {loguniform: [1.0e-6, 1.0e-4]}
        model.lora: {choice: [null, {rank: 8, alpha: 16}]}   # a whole section as one value

How it runs (the Tune-over-Train pattern of Ray 2.5x+, not the deprecated `Tuner(trainer)`):

- The driver prepares the scored data once per distinct data config (the keys `config.changes_scored_data`
  names: `data.*` but the cache folder, the scoring pool and the bad-row gate, and the model's name/dtype; they
  must be swept with grid/choice); the workers of every trial of that data config read the same scored folder.
- Each trial is a small driver function (no CPU of its own) that builds the trial's `TorchTrainer` through
  `drivers.train.build_trainer`, the code of `mallows-ray train`, with Tune's `TuneReportCallback`: the workers'
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

Modules:

    config.py   the sweep YAML: settings, search space, validation against the training config
    trials.py   concurrency, trial names, the function each trial runs, the trial-end log
    results.py  the results rows, the best trial, results.csv/.md, best_config.yaml
    run.py      run_sweep (prepare, Tuner or resume, results) and the `mallows-ray tune` command

An application on top of the library: of the rest of mallows_ray only the CLI imports it.
"""
