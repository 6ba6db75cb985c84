"""Sweep YAML: search-space parsing, grid expansion, validation errors that name the key, trial naming,
concurrency, the results table and the best config's round trip through `load_config`. No Ray is started."""

import csv
import itertools
from types import SimpleNamespace

import pytest
import yaml

from mallows_ray.config import load_config
from mallows_ray.tune.config import expected_trials, load_sweep_config, sample_configs
from mallows_ray.tune.results import best_config, best_row, write_tables
from mallows_ray.tune.trials import TrialContext, max_concurrent_trials, trial_name, variant_key
from mallows_ray.typed_config import ConfigError, to_dict

BASE = {
    "data": {"train": "prefs.jsonl", "validation": "val.jsonl"},
    "loss": {"name": "mallows_theta", "beta": 0.1},
    "optim": {"lr": 1.0e-3, "max_steps": 8},
    "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
    "run": {"name": "base-run", "storage_path": "/tmp/runs", "eval_every": 2},
}


def _write(tmp_path, sweep, base=BASE):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"sweep": sweep, **base}, sort_keys=False))
    return path


def _grid(**space):
    return {"name": "s", "search": "grid", "space": {k: {"grid": v} for k, v in space.items()}}


def test_grid_space_parses_and_expands_to_every_combination(tmp_path):
    path = _write(tmp_path, {**_grid(**{"loss.beta": [0.05, 0.5], "optim.lr": [1e-3, 1e-7],
                                        "data.dispersion_scale": [0.5, "auto"]}),
                             "scheduler": {"name": "asha", "grace_period": 2, "max_t": 8}})
    sweep = load_sweep_config(path)
    assert [(d.key, d.kind, d.values) for d in sweep.space] == [
        ("loss.beta", "grid", (0.05, 0.5)), ("optim.lr", "grid", (1e-3, 1e-7)),
        ("data.dispersion_scale", "grid", (0.5, "auto"))]
    assert sweep.settings.scheduler.grace_period == 2 and sweep.settings.scheduler.time_attr == "step"
    checked = list(sample_configs(sweep))
    assert len(checked) == 8
    assert {(c.loss.params["beta"], c.optim.lr, c.data.dispersion_scale) for _, c in checked} == set(
        itertools.product((0.05, 0.5), (1e-3, 1e-7), (0.5, "auto")))
    assert all(c.run.eval_every == 2 and c.data.train == "prefs.jsonl" for _, c in checked)  # the base underneath
    assert [d.affects_preparation for d in sweep.space] == [False, False, True]


def test_expected_trials_counts_grid_points_times_samples(tmp_path):
    grid = load_sweep_config(_write(tmp_path, {**_grid(**{"loss.beta": [0.1, 0.2, 0.3], "optim.lr": [1e-3, 1e-4]}),
                                               "num_samples": 2}))
    assert expected_trials(grid) == 12
    sampled = load_sweep_config(_write(tmp_path, {"search": "random", "num_samples": 5, "space": {
        "loss.beta": {"grid": [0.1, 0.2]}, "optim.lr": {"loguniform": [1e-6, 1e-3]}}}))
    assert expected_trials(sampled) == 10  # Tune crosses grid dimensions with every sample


def test_sampled_dimensions_and_overrides(tmp_path):
    path = _write(tmp_path, {"search": "random", "num_samples": 3, "space": {
        "optim.lr": {"loguniform": [1e-6, 1e-3]}, "batch.gradient_accumulation": {"randint": [1, 4]},
        "loss": {"choice": [{"name": "dpo", "beta": 0.1}, {"name": "simpo", "beta": 2.0, "gamma": 0.5}]}}})
    sweep = load_sweep_config(path, ["sweep.num_samples=5", "optim.max_steps=12"])
    assert sweep.settings.num_samples == 5 and sweep.base["optim"]["max_steps"] == 12
    # bounds and listed values are all checked: 2 x 2 x 2 configs, a whole loss section swapped in each
    losses = {(c.loss.name, tuple(sorted(c.loss.params.items()))) for _, c in sample_configs(sweep)}
    assert losses == {("dpo", (("beta", 0.1),)), ("simpo", (("beta", 2.0), ("gamma", 0.5)))}


@pytest.mark.parametrize("space, needle", [
    ({"loss.betta": {"grid": [0.1]}}, "sweep.space.loss.betta=0.1"),
    ({"optim.lrr": {"grid": [0.1]}}, "unknown key optim.lrr; valid keys of optim: lr"),
    ({"lossy.beta": {"grid": [0.1]}}, "unknown key lossy; valid keys: model"),
    ({"optim.lr": {"grid": [0.1, -1.0]}}, "sweep.space.optim.lr=-1.0: optim.lr: -1.0 is out of range"),
    ({"deepspeed.zero_stage": {"grid": [2, 5]}}, "sweep.space.deepspeed.zero_stage=5"),
    ({"loss.beta": {"gird": [0.1]}}, "sweep.space.loss.beta: {'gird': [0.1]} is not a search dimension"),
    ({"loss.beta": {"grid": []}}, "sweep.space.loss.beta: grid takes a non-empty list"),
    ({"loss.beta": {"grid": 0.1}}, "sweep.space.loss.beta: grid takes a non-empty list"),
    ({"loss.beta": {"uniform": [0.5, 0.1]}}, "need low < high"),
    ({"optim.lr": {"loguniform": [0.0, 0.1]}}, "and low > 0"),
    ({"loss.beta": {"uniform": [0.1, 0.5]}}, "search: grid takes only {grid: [...]} dimensions, got uniform"),
    ({"run.name": {"grid": ["a", "b"]}}, "sweep.space.run.name: the sweep sets run.name"),
])
def test_space_errors_name_the_key(tmp_path, space, needle):
    with pytest.raises(ConfigError) as err:
        load_sweep_config(_write(tmp_path, {"search": "grid", "space": space}))
    assert needle in str(err.value)


def test_data_keys_must_be_listed_and_optuna_takes_no_grid(tmp_path):
    with pytest.raises(ConfigError, match=r"sweep.space.data.dispersion_scale: this key changes the scored data"):
        load_sweep_config(_write(tmp_path, {"search": "random",
                                            "space": {"data.dispersion_scale": {"uniform": [0.3, 1.0]}}}))
    pytest.importorskip("optuna")
    with pytest.raises(ConfigError, match="optuna samples its trials and takes no grid"):
        load_sweep_config(_write(tmp_path, {**_grid(**{"loss.beta": [0.1]}), "search": "optuna"}))


def test_optuna_without_the_extra_says_how_to_install(tmp_path):
    import importlib.util

    if importlib.util.find_spec("optuna") is not None:
        pytest.skip("optuna is installed")
    with pytest.raises(ConfigError, match=r"pip install 'mallows-ray\[optuna\]'"):
        load_sweep_config(_write(tmp_path, {"search": "optuna", "space": {"loss.beta": {"choice": [0.1]}}}))


@pytest.mark.parametrize("sweep, needle", [
    ({"space": {"loss.beta": {"grid": [0.1]}}, "serch": "grid"}, "unknown key sweep.serch; valid keys of sweep"),
    ({"space": {}}, "sweep.space: empty"),
    ({"space": {"loss.beta": {"grid": [0.1]}}, "mode": "lowest"}, "sweep.mode: 'lowest' is not allowed"),
    ({"space": {"loss.beta": {"grid": [0.1]}}, "scheduler": {"name": "asha", "grace_period": 9, "max_t": 4}},
     "grace_period 9 exceeds max_t 4"),
    ({"space": {"loss.beta": {"grid": [0.1]}}, "scheduler": {"name": "hyperband"}}, "sweep.scheduler"),
    ({"space": {"loss.beta": {"grid": [0.1]}}, "storage_path": "s3://bucket/sweeps"}, "object-store URIs"),
    ({"space": {"loss.beta": {"grid": [0.1]}}, "name": "a/b"}, "sweep.name: 'a/b' names a folder"),
])
def test_sweep_section_errors(tmp_path, sweep, needle):
    with pytest.raises(ConfigError) as err:
        load_sweep_config(_write(tmp_path, sweep))
    assert needle in str(err.value)


def test_base_config_errors_and_missing_sweep_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key optim.lrate"):
        load_sweep_config(_write(tmp_path, _grid(**{"loss.beta": [0.1]}), {**BASE, "optim": {"lrate": 1.0}}))
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(BASE))
    with pytest.raises(ConfigError, match="no `sweep:` section"):
        load_sweep_config(path)


def test_every_grid_point_is_validated_not_just_each_value(tmp_path):
    """Each value alone is valid; one combination (gamma with a loss that has no gamma) is not."""
    base = {**BASE, "loss": {"name": "simpo", "beta": 2.0, "gamma": 0.5}}
    with pytest.raises(ConfigError) as err:
        load_sweep_config(_write(tmp_path, {"search": "random", "space": {
            "loss.name": {"choice": ["simpo", "dpo"]}, "loss.beta": {"choice": [1.0, 2.0]}}}, base))
    assert "sweep.space.loss.name='dpo'" in str(err.value) and "gamma" in str(err.value)


def test_concurrency_from_cluster_and_trial_needs():
    configs = [load_config(None, ["scaling.num_workers=2", "scaling.cpus_per_worker=0.5"])]
    assert max_concurrent_trials({"CPU": 2.0}, configs) == 2
    assert max_concurrent_trials({"CPU": 16.0}, configs) == 16
    bigger = configs + [load_config(None, ["scaling.num_workers=4", "scaling.cpus_per_worker=1"])]
    assert max_concurrent_trials({"CPU": 16.0}, bigger) == 4  # sized for the largest trial
    gpu = [load_config(None, ["scaling.num_workers=2", "scaling.use_gpu=true", "scaling.cpus_per_worker=2"])]
    assert max_concurrent_trials({"CPU": 64.0, "GPU": 8.0}, gpu) == 4  # GPUs bind first
    assert max_concurrent_trials({"CPU": 0.3}, [load_config(None, ["scaling.cpus_per_worker=0.1"])]) == 3
    with pytest.raises(Exception, match="one trial needs 1 CPUs"):
        max_concurrent_trials({"CPU": 0.5}, configs)


def test_trials_side_by_side_take_their_reserved_cpus_as_threads(tmp_path):
    sweep = load_sweep_config(_write(tmp_path, _grid(**{"optim.lr": [1e-3, 1e-2]})))
    values = {"optim.lr": 1e-2}
    context = TrialContext(sweep, {variant_key(sweep, values): ("/scored", {})})
    config = context.trial_config(values, "00001_lr=0.01")
    assert config.scaling.threads_per_worker == 1  # cpus_per_worker 0.5: one thread, not the node's CPUs
    assert config.optim.lr == 1e-2 and config.data.train == "/scored"
    base = {**BASE, "scaling": {"num_workers": 1, "cpus_per_worker": 3, "threads_per_worker": 0}}
    sweep = load_sweep_config(_write(tmp_path, _grid(**{"optim.lr": [1e-3]}), base))
    context = TrialContext(sweep, {variant_key(sweep, {"optim.lr": 1e-3}): ("/scored", {})})
    assert context.trial_config({"optim.lr": 1e-3}, "t").scaling.threads_per_worker == 3
    base["scaling"]["threads_per_worker"] = 2  # set by the user: kept
    sweep = load_sweep_config(_write(tmp_path, _grid(**{"optim.lr": [1e-3]}), base))
    context = TrialContext(sweep, {variant_key(sweep, {"optim.lr": 1e-3}): ("/scored", {})})
    assert context.trial_config({"optim.lr": 1e-3}, "t").scaling.threads_per_worker == 2


def test_trial_names_are_deterministic_and_filesystem_safe():
    trial = SimpleNamespace(trial_id="3f2a1_00003", config={"optim.lr": 1e-07, "loss.beta": 0.05,
                                                             "loss": {"name": "dpo", "beta": 0.1}})
    assert trial_name(trial) == trial_name(SimpleNamespace(trial_id="99999_00003", config=dict(trial.config)))
    assert trial_name(trial) == '00003_loss=beta0.1,namedpo_beta=0.05_lr=1e-07'


def _rows():
    return [
        {"trial": "00000_lr=0.001", "optim.lr": 1e-3, "status": "completed", "total_steps": 8, "eval/loss": 0.2,
         "step": 8, "checkpoint": "/x/00000/ckpt_step000008"},
        {"trial": "00001_lr=1e-07", "optim.lr": 1e-7, "status": "early-stopped", "total_steps": 8,
         "eval/loss": 0.1, "step": 2, "checkpoint": "/x/00001/ckpt_step000002"},  # better, but only at step 2
        {"trial": "00002_lr=0.01", "optim.lr": 1e-2, "status": "completed", "total_steps": 8, "eval/loss": 0.15,
         "step": 8, "checkpoint": "/x/00002/ckpt_step000008"},
        {"trial": "00003_lr=0.1", "optim.lr": 1e-1, "status": "error", "total_steps": 8, "eval/loss": None,
         "step": None, "checkpoint": None},
    ]


def test_best_row_prefers_completed_trials_and_tables_list_every_trial(tmp_path):
    rows = _rows()
    best = best_row(rows, "eval/loss", "min")
    assert best["trial"] == "00002_lr=0.01"
    assert best_row(rows, "eval/loss", "max")["trial"] == "00000_lr=0.001"
    assert best_row([rows[1], rows[3]], "eval/loss", "min")["trial"] == "00001_lr=1e-07"  # none completed
    with pytest.raises(Exception, match="no trial reported the metric 'eval/accuracy'"):
        best_row(rows, "eval/accuracy", "max")
    write_tables(rows, tmp_path, best)
    with open(tmp_path / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["trial"] for r in table] == [r["trial"] for r in rows]
    assert [r["status"] for r in table] == ["completed", "early-stopped", "completed", "error"]
    assert table[1]["optim.lr"] == "1e-07" and table[3]["eval/loss"] == ""
    markdown = (tmp_path / "results.md").read_text().splitlines()
    assert len(markdown) == 2 + len(rows) and "**00002_lr=0.01** (best)" in markdown[4]


def test_best_config_round_trips_through_load_config(tmp_path):
    sweep = load_sweep_config(_write(tmp_path, _grid(**{"optim.lr": [1e-3, 1e-2], "loss.beta": [0.1, 0.3]})))
    best = {"trial": "00002", "optim.lr": 1e-2, "loss.beta": 0.3}
    config = best_config(sweep, best)
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    loaded = load_config(path)
    assert loaded == config
    assert loaded.optim.lr == 1e-2 and loaded.loss.params == {"beta": 0.3} and loaded.optim.max_steps == 8
    assert loaded.run.name == "s-best" and loaded.run.storage_path == "/tmp/runs"  # a fresh run, not a trial's
