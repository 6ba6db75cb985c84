"""Training a tabular softmax policy on the bandit's preference pairs; one trial, and the method x beta grid.

Policy: pi_theta(a|x) = softmax(theta[x])_a, theta [C, A] initialised at log pi_ref (so the policy starts at the
reference, u = 0 everywhere). A "response" is one arm (length 1), lp(a) = log_softmax(theta)[x, a]. Training is
deterministic: full-batch Adam (or plain GD) for `steps` steps on the count-weighted mean of the method's loss
(config.METHODS) over the aggregated pairs.

`run_trial(config) -> row` is one (method, beta) trial as a pure function of a plain dict (no Ray import here):
the Tune sweep calls it per grid point. `run_experiment(cfg)` runs the whole grid in-process on one data set.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from mallows_ray.bandit.config import METHODS, BanditConfig, load_bandit_config
from mallows_ray.bandit.problem import BanditProblem, build_problem, frontier_reward_at, policy_value, problem_frontier
from mallows_ray.losses import PairwiseInputs, build_loss
from mallows_ray.typed_config import ConfigError

# the keys of a result row, in CSV column order
ROW_KEYS = ("method", "loss", "dispersion", "beta", "reward", "kl", "frontier_reward", "frontier_gap", "final_loss",
            "pair_accuracy", "steps", "seconds")


def train_policy(problem: BanditProblem, method: str, beta: float, *, steps: int, lr: float,
                 optimizer: str = "adam") -> dict[str, Any]:
    """Full-batch training of the tabular softmax policy; returns {policy [C, A] numpy, final_loss, pair_accuracy}."""
    loss_name, source = METHODS[method]
    loss_fn = build_loss(loss_name, beta=float(beta))
    dt = torch.float64
    log_ref = torch.as_tensor(np.log(problem.reference), dtype=dt)
    ctx, win, lose = (torch.as_tensor(a, dtype=torch.long) for a in (problem.pair_context, problem.pair_winner,
                                                                      problem.pair_loser))
    weight = torch.as_tensor(problem.pair_weight, dtype=dt)
    weight = weight / weight.sum()  # [P]: the count-weighted mean is the mean over every sampled pair
    ones = torch.ones_like(weight)  # response lengths: one arm each
    disp = problem.dispersion(source)
    disp = None if disp is None else torch.as_tensor(disp, dtype=dt)[ctx]
    ref_w, ref_l = log_ref[ctx, win], log_ref[ctx, lose]
    theta = log_ref.clone().requires_grad_(True)  # policy == reference at step 0
    opt = torch.optim.Adam([theta], lr=lr) if optimizer == "adam" else torch.optim.SGD([theta], lr=lr)

    def objective() -> tuple[torch.Tensor, torch.Tensor]:
        logp = torch.log_softmax(theta, dim=-1)
        out = loss_fn(PairwiseInputs(logp[ctx, win], logp[ctx, lose], ref_w, ref_l, ones, ones, disp))
        return (out.losses * weight).sum(), (out.accuracy * weight).sum()

    for _ in range(int(steps)):
        opt.zero_grad(set_to_none=True)
        loss, _ = objective()
        loss.backward()
        opt.step()
    with torch.no_grad():
        loss, accuracy = objective()
        policy = torch.softmax(theta, dim=-1).numpy().copy()
    return {"policy": policy, "final_loss": float(loss), "pair_accuracy": float(accuracy)}


def _trial(problem: BanditProblem, cfg: BanditConfig, method: str, beta: float,
           frontier_curve: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    start = time.perf_counter()
    trained = train_policy(problem, method, beta, steps=cfg.steps, lr=cfg.lr, optimizer=cfg.optimizer)
    reward, kl = policy_value(trained["policy"], problem.rewards, problem.reference)
    best = float(frontier_reward_at(kl, frontier_curve))
    loss_name, source = METHODS[method]
    return {
        "method": method, "loss": loss_name, "dispersion": source, "beta": float(beta), "reward": reward, "kl": kl,
        "frontier_reward": best, "frontier_gap": best - reward, "final_loss": trained["final_loss"],
        "pair_accuracy": trained["pair_accuracy"], "steps": cfg.steps,
        "seconds": time.perf_counter() - start,
    }


def run_experiment(cfg: BanditConfig, problem: BanditProblem | None = None) -> list[dict[str, Any]]:
    """Every method in cfg.methods at every beta in cfg.betas, on one shared data set (`problem`, when the
    caller already built it from the same config); rows in methods x betas order."""
    problem = problem or build_problem(cfg)
    curve = problem_frontier(problem, cfg)
    return [_trial(problem, cfg, method, beta, curve) for method in cfg.methods for beta in cfg.betas]


def run_trial(config: dict[str, Any]) -> dict[str, Any]:
    """One (method, beta) trial: `config` = bandit config keys plus "method" and "beta", a plain dict as Ray Tune
    passes it. Pure and deterministic.

    Returns the result row (ROW_KEYS): a Ray Tune trainable can report it as is (maximise "reward", or minimise
    "frontier_gap"). The data are regenerated from the seed, identical in every trial, so the row equals the
    matching row of `run_experiment`: it is that grid with one point.
    """
    data = dict(config)
    missing = [key for key in ("method", "beta") if key not in data]
    if missing:
        raise ConfigError(f"run_trial needs the trial's method and beta beside the bandit keys; missing {missing}")
    point = {"methods": [data.pop("method")], "betas": [data.pop("beta")]}  # checked like any grid
    (row,) = run_experiment(load_bandit_config({**data, **point}))
    return row
