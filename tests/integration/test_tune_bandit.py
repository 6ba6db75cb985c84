"""The bandit's method x beta grid as a real Ray Tune sweep gives exactly the in-process numbers."""

import pytest

from mallows_ray.bandit.config import load_bandit_config
from mallows_ray.bandit.sweep import bandit_sweep
from mallows_ray.bandit.training import run_experiment

CONFIG = load_bandit_config({"methods": ["dpo", "mallows_theta_true"], "betas": [0.1, 1.0], "steps": 60,
                             "pairs_per_context": 2000})


def test_sweep_matches_in_process_run(ray_local, tmp_path):
    swept = bandit_sweep(CONFIG, tmp_path / "tune")
    direct = run_experiment(CONFIG)
    assert [(r["method"], r["beta"]) for r in swept] == [(r["method"], r["beta"]) for r in direct]
    for mine, theirs in zip(swept, direct):
        for key in ("reward", "kl", "frontier_gap", "final_loss"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-12), (mine["method"], mine["beta"], key)
    # the finished trials are on disk where the sweep said
    assert any((tmp_path / "tune" / "mallows-bandit").iterdir())
