"""The Mallows bandit: exact sampler, closed-form frontier against brute force, the experiment and its outputs."""

import csv
import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch

from mallows_ray.bandit.cli import main
from mallows_ray.bandit.config import METHODS, BanditConfig, load_bandit_config
from mallows_ray.bandit.problem import (
    build_problem,
    default_etas,
    frontier,
    frontier_reward_at,
    policy_value,
    sample_mallows_kendall,
)
from mallows_ray.bandit.summary import summarize, write_outputs
from mallows_ray.bandit.training import run_experiment, run_trial
from mallows_ray.losses import kendall_link
from mallows_ray.typed_config import ConfigError, to_dict

TINY = load_bandit_config({"phis": [0.2, 0.8], "num_arms": 4, "pairs_per_context": 2000, "steps": 100,
                           "betas": [0.1, 1.0, 10.0], "methods": list(METHODS), "seed": 3})


def count_inversions(orderings: np.ndarray) -> np.ndarray:
    """Kendall distance of each ordering [N, n] to the identity: #{r < t : o[r] > o[t]} (a 1-D ordering: a scalar)."""
    o = np.asarray(orderings)
    if o.ndim == 1:
        return count_inversions(o[None])[0]
    later = np.triu(np.ones((o.shape[1], o.shape[1]), dtype=bool), k=1)  # [r, t]: r < t
    return ((o[:, :, None] > o[:, None, :]) & later).sum(axis=(1, 2))


# --- the Mallows-Kendall sampler ------------------------------------------------------------------------------


def test_count_inversions_brute_force():
    perms = np.array(list(itertools.permutations(range(5))))
    brute = [sum(p[a] > p[b] for a in range(5) for b in range(a + 1, 5)) for p in perms]
    assert count_inversions(perms).tolist() == brute
    assert count_inversions(np.array([2, 0, 1])) == 2


@pytest.mark.parametrize("phi", [0.3, 0.8])
def test_pairwise_frequencies_match_kendall_link(phi):
    n_items, n = 5, 40000
    order = sample_mallows_kendall(n_items, phi, n, np.random.default_rng(11))
    assert sorted(order[0].tolist()) == list(range(n_items))
    rank = np.argsort(order, axis=1)
    for i in range(n_items):
        for j in range(i + 1, n_items):
            freq = float((rank[:, i] < rank[:, j]).mean())
            g = float(kendall_link(torch.tensor(float(j - i), dtype=torch.float64), phi))
            sd = math.sqrt(g * (1 - g) / n)
            assert abs(freq - g) < 4.5 * sd + 1e-3, (i, j, freq, g)


def test_permutation_law_is_exact_mallows_chi_square():
    n_items, phi, n = 4, 0.6, 24000
    perms = list(itertools.permutations(range(n_items)))
    inv = count_inversions(np.array(perms))
    probs = phi ** inv.astype(float)
    probs /= probs.sum()
    order = sample_mallows_kendall(n_items, phi, n, np.random.default_rng(5))
    index = {p: k for k, p in enumerate(perms)}
    observed = np.bincount([index[tuple(row)] for row in order.tolist()], minlength=len(perms))
    expected = n * probs
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 49.73  # chi-square, 23 degrees of freedom, upper 0.1% point
    # inversion-count law: Mahonian numbers times phi^k, over prod_i (1 - phi^i) / (1 - phi)
    z = np.prod([(1 - phi ** i) / (1 - phi) for i in range(1, n_items + 1)])
    mahonian = [1, 3, 5, 6, 5, 3, 1]
    exact = np.array([m * phi ** k / z for k, m in enumerate(mahonian)])
    empirical = np.bincount(count_inversions(order), minlength=7) / n
    assert exact.sum() == pytest.approx(1.0)
    assert np.abs(empirical - exact).max() < 0.01


def test_sampler_edge_dispersions():
    rng = np.random.default_rng(0)
    assert (sample_mallows_kendall(4, 0.0, 50, rng) == np.arange(4)).all()  # phi = 0: the central ranking
    uniform = count_inversions(sample_mallows_kendall(3, 1.0, 30000, rng))
    assert np.abs(np.bincount(uniform, minlength=4) / 30000 - np.array([1, 2, 2, 1]) / 6).max() < 0.015
    with pytest.raises(ValueError):
        sample_mallows_kendall(3, 1.5, 1, rng)


# --- the problem -----------------------------------------------------------------------------------------------


def test_build_problem_pairs_and_determinism():
    p = build_problem(TINY)
    assert p.rewards.shape == p.reference.shape == (2, 4)
    for x in range(2):  # central ranking orders arms by reward; linear rewards 1, 2/3, 1/3, 0
        assert np.allclose(p.rewards[x, p.central[x]], [1.0, 2 / 3, 1 / 3, 0.0])
        assert p.pair_weight[p.pair_context == x].sum() == TINY.pairs_per_context
    assert np.allclose(p.s_true, -np.log([0.2, 0.8]))
    # concentrated context: better arm wins more often than in the dispersed one
    def win_rate(x):
        m = p.pair_context == x
        better = np.argsort(p.central[x])[p.pair_winner[m]] < np.argsort(p.central[x])[p.pair_loser[m]]
        return float((p.pair_weight[m] * better).sum() / p.pair_weight[m].sum())
    assert win_rate(0) > win_rate(1) > 0.5
    q = build_problem(TINY)
    assert np.array_equal(p.pair_weight, q.pair_weight) and np.array_equal(p.s_noisy, q.s_noisy)
    assert not np.allclose(p.s_noisy, p.s_true)
    pop = build_problem(dataclasses.replace(TINY, population=True))
    for x in range(2):
        assert pop.pair_weight[pop.pair_context == x].sum() == pytest.approx(1.0)


def test_config_validation():
    with pytest.raises(ConfigError, match="unknown key bandit.stepz; valid keys of bandit: phis, num_arms"):
        load_bandit_config({"stepz": 3})
    with pytest.raises(ConfigError, match=r"bandit.methods\[0\]: 'ppo' is not allowed; expected one of 'dpo'"):
        load_bandit_config({"methods": ["ppo"]})
    with pytest.raises(ConfigError, match="bandit.phis"):
        load_bandit_config({"phis": [0.0]})
    with pytest.raises(ConfigError, match=r"bandit.steps: 0 is out of range; expected a value in \[1, inf\)"):
        load_bandit_config({"steps": 0})
    assert load_bandit_config().phis == BanditConfig().phis == [0.2, 0.5, 0.8, 0.95]


# --- the frontier ----------------------------------------------------------------------------------------------


def _brute_force(rewards, ref, eta):
    """max_theta E_x[E_{a~softmax(theta)} r - eta KL] by L-BFGS over unconstrained logits, float64."""
    r, log_ref = torch.tensor(rewards), torch.log(torch.tensor(ref))
    logits = torch.zeros_like(r, requires_grad=True)
    opt = torch.optim.LBFGS([logits], lr=1.0, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def objective():
        log_pi = torch.log_softmax(logits, -1)
        pi = log_pi.exp()
        return ((pi * r).sum(-1) - eta * (pi * (log_pi - log_ref)).sum(-1)).mean()

    def closure():
        opt.zero_grad()
        loss = -objective()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(objective()), torch.softmax(logits, -1).numpy()


def test_frontier_matches_brute_force_optimisation():
    rng = np.random.default_rng(2)
    rewards = rng.uniform(0, 1, size=(3, 4))
    ref = rng.dirichlet(np.ones(4) * 2, size=3)
    etas = np.array([0.1, 0.3, 1.0])
    kl, reward = frontier(rewards, ref, etas)
    for e, eta in enumerate(etas):
        best, pi = _brute_force(rewards, ref, float(eta))
        assert reward[e] - eta * kl[e] == pytest.approx(best, abs=1e-6)
        star = ref * np.exp(rewards / eta)
        star /= star.sum(1, keepdims=True)
        assert np.abs(pi - star).max() < 1e-5
        assert (reward[e], kl[e]) == pytest.approx(policy_value(star, rewards, ref), abs=1e-10)


def test_frontier_monotone_and_dominates_random_policies():
    rng = np.random.default_rng(4)
    rewards = rng.uniform(0, 1, size=(4, 5))
    ref = np.full((4, 5), 0.2)
    curve = frontier(rewards, ref, default_etas())
    order = np.argsort(curve[0])
    assert np.all(np.diff(curve[1][order]) >= -1e-12)            # reward increases with KL
    assert np.all(np.diff(curve[0][::-1]) >= -1e-12)              # KL decreases with eta
    assert curve[0].min() < 1e-6 and curve[1].min() == pytest.approx(rewards.mean(), abs=5e-4)
    assert curve[1].max() == pytest.approx(rewards.max(1).mean(), abs=1e-3)
    for scale in (0.3, 1.0, 3.0, 10.0):
        logits = rng.normal(size=(200, 4, 5)) * scale
        pis = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        for pi in pis:
            r, kl = policy_value(pi, rewards, ref)
            assert r <= frontier_reward_at(kl, curve) + 1e-4


# --- the experiment --------------------------------------------------------------------------------------------


def test_run_experiment_tiny_below_frontier_and_beta_orders_kl():
    rows = run_experiment(TINY)
    assert len(rows) == len(METHODS) * len(TINY.betas)
    p = build_problem(TINY)
    curve = frontier(p.rewards, p.reference, default_etas())
    for row in rows:
        assert set(row) >= {"method", "beta", "reward", "kl", "steps", "seconds"}
        assert row["steps"] == TINY.steps and row["kl"] >= 0
        assert row["reward"] <= frontier_reward_at(row["kl"], curve) + 1e-6, row
        assert row["frontier_gap"] >= -1e-6
    dpo_kl = [r["kl"] for r in rows if r["method"] == "dpo"]   # betas ascending
    assert all(a > b for a, b in zip(dpo_kl, dpo_kl[1:]))
    # run_trial is the same computation, one (method, beta) at a time
    trial = run_trial({**to_dict(TINY), "method": "mallows_theta_true", "beta": 1.0})
    row = next(r for r in rows if r["method"] == "mallows_theta_true" and r["beta"] == 1.0)
    assert trial["reward"] == pytest.approx(row["reward"], abs=1e-12) and trial["kl"] == pytest.approx(row["kl"])
    with pytest.raises(ValueError, match="method"):
        run_trial(to_dict(TINY))


def test_population_limit_mallows_on_frontier_dpo_below():
    """Infinite data, linear rewards: MallowsPO-phi's optimum is on the frontier, DPO's is not (module doc)."""
    cfg = load_bandit_config({"phis": [0.2, 0.9], "num_arms": 3, "population": True, "steps": 300, "betas": [0.5],
                              "methods": ["dpo", "mallows_theta_true", "mallows_phi_true"]})
    gaps = {r["method"]: r["frontier_gap"] for r in run_experiment(cfg)}
    assert abs(gaps["mallows_phi_true"]) < 2e-3
    assert gaps["mallows_theta_true"] < 0.01
    assert gaps["dpo"] > 0.03


# --- outputs ---------------------------------------------------------------------------------------------------


def _rows_and_curve():
    cfg = dataclasses.replace(TINY, steps=30, methods=["dpo", "mallows_theta_true"])
    p = build_problem(cfg)
    return run_experiment(cfg), frontier(p.rewards, p.reference, default_etas())


def test_summarize_matched_kl():
    rows, curve = _rows_and_curve()
    s = summarize(rows, curve)
    assert s["dpo"]["reward_vs_baseline"] is None and s["dpo"]["mean_frontier_gap"] >= -1e-9
    lo, hi = s["mallows_theta_true"]["kl_window"]
    assert 0 <= lo < hi
    assert math.isfinite(s["mallows_theta_true"]["reward_vs_baseline"])


def test_write_outputs(tmp_path):
    pytest.importorskip("matplotlib")
    rows, curve = _rows_and_curve()
    paths = write_outputs(rows, curve, tmp_path / "out", notes="tiny run")
    with paths["csv"].open() as fh:
        read = list(csv.DictReader(fh))
    assert len(read) == len(rows)
    assert float(read[0]["reward"]) == pytest.approx(rows[0]["reward"]) and read[0]["method"] == "dpo"
    md = paths["markdown"].read_text()
    assert "| method | beta | reward | KL |" in md and "mallows_theta_true" in md and "## Summary" in md
    assert json.loads(paths["summary"].read_text())["mallows_theta_true"]["points"] == 3
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    with paths["frontier_csv"].open() as fh:
        assert len(list(csv.DictReader(fh))) == len(default_etas())


def test_main_cli(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--steps", "20", "--betas", "1,10", "--pairs-per-context", "300",
            "--methods", "dpo,mallows_phi_true", "--phis", "0.3,0.7", "--arms", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| mallows_phi_true | 10 |" in out
    assert (tmp_path / "results.csv").exists() and (tmp_path / "results.md").exists()
    assert main(["--out", str(tmp_path), "--phis", "1.5"]) == 2
