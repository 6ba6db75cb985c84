"""`mallows-ray tune` end to end on a real local Ray (2 CPUs): a 4-trial grid (lr x beta) of Ray Train runs of a
tiny Llama on a learnable preference set, ASHA on eval/loss, interrupted (SIGINT, as Ctrl+C) after the first
trial ends and resumed, then the best config trained with `mallows-ray train`.

Trials run one at a time (sweep.max_concurrent_trials: 1) so that ASHA's decisions do not depend on which of
two concurrent trials reaches a rung first: with lr 1e-7 a trial's eval/loss stays at log 2 while lr 5e-3
trials improve, so a tiny-lr trial that reaches the step-2 rung after any other trial is below the median
there and is stopped (the scheduler's rungs start empty again on resume, which Tune does not checkpoint).
"""

import csv
import json
import math
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from background import in_thread
from preference_data import write_jsonl, yes_no_pairs

from mallows_ray.cli import main
from mallows_ray.config import load_config
from mallows_ray.tune.config import load_sweep_config
from mallows_ray.tune.run import SweepInterrupted, run_sweep

STEPS = 8  # one epoch of 16 prompts in global batches of 2
GOOD_LR, BAD_LR = 5e-3, 1e-7


def _sweep_yaml(tmp_path, tiny_model_dir):
    config = {
        "sweep": {
            "name": "lr-beta", "storage_path": str(tmp_path / "sweeps"), "search": "grid",
            "metric": "eval/loss", "mode": "min", "max_concurrent_trials": 1,
            "scheduler": {"name": "asha", "grace_period": 2, "reduction_factor": 2, "max_t": STEPS},
            "space": {"optim.lr": {"grid": [GOOD_LR, BAD_LR]}, "loss.beta": {"grid": [0.1, 0.3]}},
        },
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", yes_no_pairs(16, 0))),
                 "validation": str(write_jsonl(tmp_path / "validation.jsonl", yes_no_pairs(4, 100))),
                 "cache_dir": str(tmp_path / "cache"), "max_prompt_length": 48, "max_response_length": 24},
        "loss": {"name": "mallows_theta", "beta": 0.1},
        "optim": {"lr": GOOD_LR, "schedule": "constant", "max_steps": STEPS},
        "batch": {"micro_batch_size": 2, "gradient_accumulation": 1},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "deepspeed": {"zero_stage": 2},
        # reports to Ray (ASHA's intermediate results) at every eval/checkpoint step
        "run": {"name": "unused", "storage_path": str(tmp_path / "runs"), "eval_every": 2, "checkpoint_every": 4,
                "keep_checkpoints": 1},
        "export": {"enabled": False},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _finished(experiment):
    path = experiment / "finished.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _interrupt_after_first_trial_ends(experiment):
    """From a thread: SIGINT this process (Tune's Ctrl+C handler) once a trial is recorded as ended; never
    after the block is left (a late signal would hit whatever pytest runs next)."""

    def watch(done):
        while not done.is_set():
            if _finished(experiment):
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.5)

    return in_thread(watch)


@pytest.mark.slow
def test_sweep_early_stops_resumes_and_its_best_config_trains(ray_local, tiny_model_dir, tmp_path, capsys):
    started = time.time()
    sweep = load_sweep_config(_sweep_yaml(tmp_path, tiny_model_dir))
    experiment = sweep.experiment_dir

    # ---- first run: interrupted once the first trial has ended
    with _interrupt_after_first_trial_ends(experiment), \
            pytest.raises(SweepInterrupted, match="run the same command again to resume"):
        run_sweep(sweep)
    ended_first = {line["trial"] for line in _finished(experiment)}
    assert 1 <= len(ended_first) < 4
    # what the ended trials wrote: a rerun would append to their example logs
    logs = {name: (experiment / "runs" / name / "examples" / "rank0.jsonl").read_text() for name in ended_first}
    assert not (experiment / "results.csv").exists()  # no table for an unfinished sweep

    # ---- the same sweep again: resumes, the ended trials are not rerun
    result = run_sweep(load_sweep_config(_sweep_yaml(tmp_path, tiny_model_dir)))
    ended = Counter(line["trial"] for line in _finished(experiment))
    assert len(ended) == 4 and set(ended.values()) == {1}, ended  # every trial ended exactly once
    for name, text in logs.items():
        assert (experiment / "runs" / name / "examples" / "rank0.jsonl").read_text() == text

    # ---- the results table
    rows = {row["trial"]: row for row in result.rows}
    assert len(rows) == 4
    with open(experiment / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["trial"] for r in table] == sorted(rows)
    assert {r["status"] for r in table} <= {"completed", "early-stopped"}
    stopped = [r for r in result.rows if r["status"] == "early-stopped"]
    completed = [r for r in result.rows if r["status"] == "completed"]
    assert stopped, "ASHA stopped no trial"
    assert all(r["optim.lr"] == BAD_LR and r["step"] < STEPS for r in stopped)
    assert all(r["step"] == STEPS == r["total_steps"] and Path(r["checkpoint"]).is_dir() for r in completed)
    assert {r["optim.lr"] for r in completed} >= {GOOD_LR}
    assert all(math.isfinite(row["eval/loss"]) for row in result.rows)
    assert all(r["checkpoint"] is None for r in stopped if r["step"] < 4)  # stopped before its first checkpoint
    assert (experiment / "results.md").read_text().count("\n") == 2 + 4

    # ---- the best trial: a good-lr one, its config trains with `mallows-ray train`
    best = result.best
    assert best["optim.lr"] == GOOD_LR and best["status"] == "completed"
    assert best["eval/loss"] == min(r["eval/loss"] for r in completed) < math.log(2) - 0.01
    assert result.best_checkpoint == best["checkpoint"] and Path(result.best_checkpoint).name == f"ckpt_step{STEPS:06d}"
    best_config = load_config(result.best_config_path)
    assert best_config.optim.lr == best["optim.lr"] and best_config.loss.params["beta"] == best["loss.beta"]
    assert best_config.run.name == "lr-beta-best"
    capsys.readouterr()
    assert main(["train", "--config", result.best_config_path]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["metrics"]["step"] == STEPS
    assert trained["metrics"]["eval/loss"] == pytest.approx(best["eval/loss"], abs=1e-4)  # the same run again
    assert Path(trained["checkpoint"]).parent == Path(best_config.run.storage_path).expanduser() / "lr-beta-best"
    print(f"sweep test: {time.time() - started:.0f} s; {len(stopped)} trial(s) stopped early; best {best['trial']} "
          f"eval/loss {best['eval/loss']:.4f}")
