"""The Mallows bandit: why the dispersion index matters, in seconds on a CPU (ALGORITHMS.md sections 1, 2, 2.1, 2.2).

Setup (every number below is a config key, see DEFAULT_CONFIG):

- Contexts x = 0..C-1 with known dispersions phi(x) (default 0.2, 0.5, 0.8, 0.95), s(x) = -log phi(x);
  A arms (default 5) with known rewards r(x, a). The central ranking of context x orders its arms by reward.
  Default rewards ("linear"): in every context the arm at central rank k earns 1 - k/(A-1), the arms being a
  seeded permutation per context, so every context is worth the same and only the dispersion differs.
  "random": seeded uniform(0, 1) rewards; or an explicit [C][A] list.
- Preference data: per context, `pairs_per_context` full rankings drawn exactly from the Mallows model with
  Kendall distance, P(ranking) ∝ phi(x)^inversions (repeated insertion method, `sample_mallows_kendall`); each
  ranking yields ONE preference pair: a uniformly random pair of distinct arms, winner = the one ranked higher.
  The probability that the arm better by d central places wins is the Kendall link g_phi(d) of section 2.2, so
  concentrated contexts (small phi) give consistent preferences and dispersed ones noisy preferences.
  Identical (x, winner, loser) pairs are aggregated into counts; the full-batch loss is the count-weighted mean,
  i.e. exactly the mean over all sampled pairs, so training cost does not grow with the data. With
  `population: true` every ordered pair instead carries its exact probability (the infinite-data limit).
  Sample size matters: at phi = 0.95 the better of two adjacent arms wins with probability 1/1.95 = 0.513, so
  a few hundred pairs per context cannot recover that context's ranking; the default is 20000 per context.
- Policy: tabular softmax pi_theta(a|x) = softmax(theta[x])_a, theta [C, A] initialised at log pi_ref (so the
  policy starts at the reference, u = 0 everywhere); pi_ref uniform or given. A "response" is one arm (length 1),
  lp(a) = log_softmax(theta)[x, a]. Training is deterministic: full-batch Adam (or plain GD) for `steps` steps.
- Methods (METHODS): `dpo` (section 1); `mallows_theta_true` (2.1 with the true s(x)); `mallows_theta_noisy`
  (2.1 with s_hat(x) = s(x) * exp(noise_sigma * eps_x), eps_x ~ N(0, 1) seeded: multiplicative log-normal noise,
  median-unbiased, mean s * exp(sigma^2/2)); `mallows_phi_true` (2.2 with the true phi(x)); also available:
  `mallows_phi_noisy`. s(x) enters the losses unscaled (no `c`, section 2.3): for MallowsPO-theta a global
  scale of s is the same as a different beta, and the beta grid is swept anyway; MallowsPO-phi needs the true
  scale, phi = exp(-s).
- Evaluation of a policy: expected reward E_x E_{a~pi}[r(x, a)] and KL(pi || pi_ref) averaged over contexts
  (contexts uniform, KL in nats).
- The optimal reward-KL frontier (`frontier`): max E[r] - eta * KL is attained by pi*(a|x) ∝ pi_ref(a|x)
  exp(r(x, a) / eta), with ONE eta for every context; sweeping eta traces the best reward at each KL. No policy
  lies above it. DPO fits a Bradley-Terry reward of roughly s(x) * (rank score) / beta, i.e. it tilts concentrated
  contexts harder than dispersed ones, an eta that differs per context, which is off the frontier when contexts
  are equally valuable. MallowsPO-theta divides that s(x) out (approximately: logit g_phi(d) is not exactly
  s * d); MallowsPO-phi fits g_phi(beta * u) = g_phi(d), whose population optimum is beta * (h_a - h_b) = rank gap
  exactly, on the frontier for "linear" rewards. Finite data and finite steps keep every method below it.
- Summary (`summarize`): per method, the mean gap to the frontier at its own points (frontier reward at the
  point's KL minus its reward), and against DPO at matched KL: both methods' (KL, reward) points, sorted by KL,
  are joined piecewise-linearly; over the KL window both curves cover, the mean of (reward_method - reward_dpo)
  on 101 evenly spaced KLs ("reward at matched KL"), and the share of DPO's frontier gap that the method closes
  there.

`run_trial(config) -> dict` is one (method, beta) trial as a pure function of its config (no Ray import here):
a later Ray Tune sweep calls it per grid point. `run_experiment`, `write_outputs` and `main` (`python -m
mallows_ray.bandit --out DIR`) run the whole grid and write CSV, markdown and a PNG plot.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from mallows_ray.losses import PairwiseInputs, build_loss

# name -> (loss in the registry, which s(x) it reads: "none" | "true" | "noisy")
METHODS: dict[str, tuple[str, str]] = {
    "dpo": ("dpo", "none"),
    "mallows_theta_true": ("mallows_theta", "true"),
    "mallows_theta_noisy": ("mallows_theta", "noisy"),
    "mallows_phi_true": ("mallows_phi", "true"),
    "mallows_phi_noisy": ("mallows_phi", "noisy"),
}
DEFAULT_METHODS = ("dpo", "mallows_theta_true", "mallows_theta_noisy", "mallows_phi_true")

DEFAULT_CONFIG: dict[str, Any] = {
    "phis": [0.2, 0.5, 0.8, 0.95],  # dispersion phi(x) per context, in (0, 1]
    "num_arms": 5,
    "rewards": "linear",            # "linear" | "random" | explicit [C][A] list
    "reference": "uniform",         # "uniform" | explicit [C][A] probabilities (> 0, rows sum to 1)
    "pairs_per_context": 20000,     # Mallows rankings sampled per context, one preference pair each
    "population": False,            # True: exact pair probabilities instead of samples (infinite data)
    "seed": 0,                      # seeds rewards (arm permutations), data and dispersion noise
    "noise_sigma": 0.5,             # s_hat = s * exp(noise_sigma * N(0, 1)) for the *_noisy methods
    "steps": 500,
    "lr": 0.1,
    "optimizer": "adam",            # "adam" | "sgd" (full-batch gradient descent)
    "betas": [0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0],
    "methods": list(DEFAULT_METHODS),
    "etas": None,                   # frontier trade-offs; None -> default_etas()
}

_ROW_FIELDS = ("method", "loss", "dispersion", "beta", "reward", "kl", "frontier_reward", "frontier_gap",
               "final_loss", "pair_accuracy", "steps", "seconds")


# --- configuration -------------------------------------------------------------------------------------------


def resolve_config(config: dict[str, Any] | None = None) -> dict[str, Any]:
    """DEFAULT_CONFIG updated with `config`, checked; unknown keys (other than method/beta) raise."""
    config = dict(config or {})
    known = set(DEFAULT_CONFIG) | {"method", "beta"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown bandit config keys {unknown}; valid keys: {sorted(known)}")
    cfg = {**DEFAULT_CONFIG, **config}
    phis = [float(p) for p in cfg["phis"]]
    if not phis or any(not 0.0 < p <= 1.0 for p in phis):
        raise ValueError(f"phis must be a non-empty list of numbers in (0, 1], got {cfg['phis']!r}")
    cfg["phis"] = phis
    if int(cfg["num_arms"]) < 2:
        raise ValueError(f"num_arms must be >= 2, got {cfg['num_arms']!r}")
    for key in ("pairs_per_context", "steps"):
        if int(cfg[key]) < 1:
            raise ValueError(f"{key} must be >= 1, got {cfg[key]!r}")
    if cfg["optimizer"] not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {cfg['optimizer']!r}")
    if float(cfg["lr"]) <= 0 or float(cfg["noise_sigma"]) < 0:
        raise ValueError("lr must be > 0 and noise_sigma >= 0")
    cfg["population"] = bool(cfg["population"])
    if not cfg["betas"] or any(float(b) <= 0 for b in cfg["betas"]):
        raise ValueError(f"betas must be a non-empty list of positive numbers, got {cfg['betas']!r}")
    cfg["betas"], cfg["methods"] = [float(b) for b in cfg["betas"]], list(cfg["methods"])  # never share defaults
    bad = [m for m in cfg["methods"] if m not in METHODS]
    if bad or not cfg["methods"]:
        raise ValueError(f"unknown methods {bad}; valid methods: {list(METHODS)}")
    if "method" in cfg and cfg["method"] not in METHODS:
        raise ValueError(f"unknown method {cfg['method']!r}; valid methods: {list(METHODS)}")
    return cfg


# --- the Mallows-Kendall sampler -----------------------------------------------------------------------------


def sample_mallows_kendall(n_items: int, phi: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Exact samples from P(ranking) ∝ phi^inversions, central ranking 0, 1, ..., n-1 (repeated insertion).

    Returns orderings [size, n_items]: row k lists the items from the top rank down. Item i (central rank i) is
    inserted among the i items already placed, v of which (v = 0..i) end up below it: each is an inversion, and
    P(v) ∝ phi^v independently across i, so the total inversion count has the Mallows law. phi = 1 is uniform,
    phi = 0 returns the central ranking.
    """
    if not 0.0 <= phi <= 1.0:
        raise ValueError(f"phi must be in [0, 1], got {phi}")
    pos = np.zeros((size, n_items), dtype=np.int64)  # pos[k, i] = rank of item i (0 = top) in sample k
    for i in range(n_items):
        weights = float(phi) ** np.arange(i + 1, dtype=np.float64)
        v = rng.choice(i + 1, size=size, p=weights / weights.sum())
        insert_at = i - v
        pos[:, :i] += pos[:, :i] >= insert_at[:, None]
        pos[:, i] = insert_at
    return np.argsort(pos, axis=1)


def count_inversions(orderings: np.ndarray) -> np.ndarray:
    """Kendall distance of each ordering [N, n] to the identity: #{r < t : o[r] > o[t]}."""
    o = np.asarray(orderings)
    if o.ndim == 1:
        return count_inversions(o[None])[0]
    later = np.triu(np.ones((o.shape[1], o.shape[1]), dtype=bool), k=1)  # [r, t]: r < t
    return ((o[:, :, None] > o[:, None, :]) & later).sum(axis=(1, 2))


# --- the problem ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BanditProblem:
    rewards: np.ndarray    # [C, A] r(x, a)
    reference: np.ndarray  # [C, A] pi_ref(a | x), > 0, rows sum to 1
    phis: np.ndarray       # [C] true dispersion phi(x)
    s_true: np.ndarray     # [C] -log phi(x)
    s_noisy: np.ndarray    # [C] s(x) * exp(noise_sigma * eps_x)
    central: np.ndarray    # [C, A] arms of context x from best to worst (the central ranking)
    pair_context: np.ndarray  # [P] aggregated pairs: context, winner arm, loser arm, weight
    pair_winner: np.ndarray
    pair_loser: np.ndarray
    pair_weight: np.ndarray   # sampled: counts; population: probabilities (each context's row sums to 1)

    def dispersion(self, source: str) -> np.ndarray | None:
        return {"none": None, "true": self.s_true, "noisy": self.s_noisy}[source]


def _rewards(spec: Any, num_contexts: int, num_arms: int, rng: np.random.Generator) -> np.ndarray:
    if isinstance(spec, str):
        if spec == "linear":
            levels = 1.0 - np.arange(num_arms) / (num_arms - 1)
            return np.stack([levels[np.argsort(rng.permutation(num_arms))] for _ in range(num_contexts)])
        if spec == "random":
            return rng.uniform(0.0, 1.0, size=(num_contexts, num_arms))
        raise ValueError(f"rewards must be 'linear', 'random' or a [C][A] list, got {spec!r}")
    rewards = np.asarray(spec, dtype=np.float64)
    if rewards.shape != (num_contexts, num_arms):
        raise ValueError(f"rewards must have shape [{num_contexts}, {num_arms}], got {list(rewards.shape)}")
    return rewards


def _reference(spec: Any, num_contexts: int, num_arms: int) -> np.ndarray:
    if isinstance(spec, str):
        if spec != "uniform":
            raise ValueError(f"reference must be 'uniform' or a [C][A] list, got {spec!r}")
        return np.full((num_contexts, num_arms), 1.0 / num_arms)
    ref = np.asarray(spec, dtype=np.float64)
    if ref.shape != (num_contexts, num_arms) or (ref <= 0).any() or not np.allclose(ref.sum(1), 1.0, atol=1e-6):
        raise ValueError(f"reference must be [{num_contexts}, {num_arms}] positive probabilities, rows summing to 1")
    return ref / ref.sum(1, keepdims=True)


def _population_pairs(phis: np.ndarray, central: np.ndarray) -> np.ndarray:
    """[C, A, A] probability that a random pair is (winner, loser): 1/#pairs * g_phi(d) or 1 - g_phi(d)."""
    from mallows_ray.losses import kendall_link

    num_contexts, num_arms = central.shape
    weights = np.zeros((num_contexts, num_arms, num_arms), dtype=np.float64)
    per_pair = 2.0 / (num_arms * (num_arms - 1))
    for x in range(num_contexts):
        for i in range(num_arms):
            for j in range(i + 1, num_arms):
                g = float(kendall_link(torch.tensor(float(j - i), dtype=torch.float64), float(phis[x])))
                weights[x, central[x, i], central[x, j]] = per_pair * g
                weights[x, central[x, j], central[x, i]] = per_pair * (1.0 - g)
    return weights


def build_problem(config: dict[str, Any] | None = None) -> BanditProblem:
    """Rewards, reference, dispersions and the preference pairs; a pure function of the config.

    With config["population"] the pairs are not sampled: every ordered pair carries its exact probability
    under the model (the infinite-data limit), which isolates the effect of dispersion from sampling noise.
    """
    cfg = resolve_config(config)
    phis = np.asarray(cfg["phis"], dtype=np.float64)
    num_contexts, num_arms, n = len(phis), int(cfg["num_arms"]), int(cfg["pairs_per_context"])
    seeds = np.random.SeedSequence(int(cfg["seed"])).spawn(3)
    reward_rng, data_rng, noise_rng = (np.random.default_rng(s) for s in seeds)
    rewards = _rewards(cfg["rewards"], num_contexts, num_arms, reward_rng)
    reference = _reference(cfg["reference"], num_contexts, num_arms)
    central = np.argsort(-rewards, axis=1, kind="stable")
    counts = np.zeros((num_contexts, num_arms, num_arms), dtype=np.float64)  # [x, winner, loser]
    if cfg["population"]:
        counts = _population_pairs(phis, central)
    for x in range(0 if cfg["population"] else num_contexts):
        order = sample_mallows_kendall(num_arms, phis[x], n, data_rng)
        rank = np.argsort(order, axis=1)  # rank[k, item]
        i = data_rng.integers(num_arms, size=n)
        j = data_rng.integers(num_arms - 1, size=n)
        j = j + (j >= i)
        rows = np.arange(n)
        i_wins = rank[rows, i] < rank[rows, j]
        winner, loser = np.where(i_wins, i, j), np.where(i_wins, j, i)
        np.add.at(counts[x], (central[x][winner], central[x][loser]), 1)
    ctx, win, lose = np.nonzero(counts)
    s_true = -np.log(phis)
    s_noisy = s_true * np.exp(float(cfg["noise_sigma"]) * noise_rng.standard_normal(num_contexts))
    return BanditProblem(rewards, reference, phis, s_true, s_noisy, central, ctx, win, lose, counts[ctx, win, lose])


# --- evaluation and the frontier -----------------------------------------------------------------------------


def policy_value(policy: np.ndarray, rewards: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(E_x E_{a~pi} r(x, a), mean_x KL(pi(.|x) || pi_ref(.|x))) with contexts uniform; KL in nats."""
    pi, r, ref = (np.asarray(a, dtype=np.float64) for a in (policy, rewards, reference))
    terms = np.where(pi > 0, pi * (np.log(np.where(pi > 0, pi, 1.0)) - np.log(ref)), 0.0)
    return float((pi * r).sum(1).mean()), float(terms.sum(1).mean())


def default_etas() -> np.ndarray:
    return np.logspace(-3, 3, 241)


def frontier(rewards: Any, reference: Any, etas: Any) -> tuple[np.ndarray, np.ndarray]:
    """The optimal reward-KL frontier: (kl [E], reward [E]) of pi*_eta ∝ pi_ref exp(r / eta), one per eta.

    pi*_eta maximises E_x[E_{a~pi} r - eta KL(pi || pi_ref)] (Gibbs variational principle, per context with a
    shared eta), hence the largest reward at its KL. Returned in the order of `etas`: larger eta, smaller KL and
    smaller reward (the frontier is increasing and concave in KL).
    """
    r = np.asarray(rewards, dtype=np.float64)
    log_ref = np.log(np.asarray(reference, dtype=np.float64))
    etas = np.asarray(etas, dtype=np.float64).reshape(-1)
    if (etas <= 0).any():
        raise ValueError("etas must be positive")
    logits = log_ref[None] + r[None] / etas[:, None, None]                        # [E, C, A]
    log_pi = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    pi = np.exp(log_pi)
    kl = (pi * (log_pi - log_ref[None])).sum(-1).mean(-1)
    reward = (pi * r[None]).sum(-1).mean(-1)
    return np.maximum(kl, 0.0), reward


def frontier_reward_at(kl: Any, frontier_curve: tuple[Any, Any]) -> np.ndarray:
    """Best achievable reward at the given KL(s): the frontier interpolated linearly, flat past its ends."""
    f_kl, f_reward = (np.asarray(a, dtype=np.float64) for a in frontier_curve)
    order = np.argsort(f_kl, kind="stable")
    return np.interp(np.asarray(kl, dtype=np.float64), f_kl[order], f_reward[order])


# --- training ------------------------------------------------------------------------------------------------


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
    weight = weight / weight.sum()
    ones = torch.ones_like(weight)
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


ROW_KEYS = ("method", "loss", "dispersion", "beta", "reward", "kl", "frontier_reward", "frontier_gap", "final_loss",
            "pair_accuracy", "steps", "seconds")


def _trial(problem: BanditProblem, cfg: dict[str, Any], method: str, beta: float,
           frontier_curve: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    start = time.perf_counter()
    trained = train_policy(problem, method, beta, steps=int(cfg["steps"]), lr=float(cfg["lr"]),
                           optimizer=cfg["optimizer"])
    reward, kl = policy_value(trained["policy"], problem.rewards, problem.reference)
    best = float(frontier_reward_at(kl, frontier_curve))
    loss_name, source = METHODS[method]
    return {
        "method": method, "loss": loss_name, "dispersion": source, "beta": float(beta), "reward": reward, "kl": kl,
        "frontier_reward": best, "frontier_gap": best - reward, "final_loss": trained["final_loss"],
        "pair_accuracy": trained["pair_accuracy"], "steps": int(cfg["steps"]),
        "seconds": time.perf_counter() - start,
    }


def _frontier_of(problem: BanditProblem, cfg: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    etas = default_etas() if cfg["etas"] is None else cfg["etas"]
    return frontier(problem.rewards, problem.reference, etas)


def run_trial(config: dict[str, Any]) -> dict[str, Any]:
    """One (method, beta) trial: `config` = bandit config keys plus "method" and "beta". Pure and deterministic.

    Returns the result row (method, loss, dispersion, beta, reward, kl, frontier_reward, frontier_gap,
    final_loss, pair_accuracy, steps, seconds): a Ray Tune trainable can report it as is (maximise "reward",
    or minimise "frontier_gap"). The data are regenerated from the seed, identical in every trial.
    """
    cfg = resolve_config(config)
    if "method" not in cfg or "beta" not in cfg:
        raise ValueError("run_trial needs config['method'] and config['beta']")
    problem = build_problem({k: v for k, v in cfg.items() if k not in ("method", "beta")})
    return _trial(problem, cfg, cfg["method"], float(cfg["beta"]), _frontier_of(problem, cfg))


def run_experiment(config: dict[str, Any] | None = None, problem: BanditProblem | None = None) -> list[dict[str, Any]]:
    """Every method in config["methods"] at every beta in config["betas"], on one shared data set
    (`problem`, when the caller already built it from the same config)."""
    cfg = resolve_config(config)
    problem = problem or build_problem({k: v for k, v in cfg.items() if k not in ("method", "beta")})
    curve = _frontier_of(problem, cfg)
    return [_trial(problem, cfg, method, float(beta), curve) for method in cfg["methods"] for beta in cfg["betas"]]


# --- summary and outputs -------------------------------------------------------------------------------------


def _curve(rows: Iterable[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    pts = sorted((float(r["kl"]), float(r["reward"])) for r in rows)
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def summarize(rows: Sequence[dict[str, Any]], frontier_curve: tuple[Any, Any],
              baseline: str = "dpo") -> dict[str, dict[str, Any]]:
    """Per method: mean frontier gap at its points, and reward at matched KL against `baseline` (see module doc).

    matched-KL fields (None when the KL ranges do not overlap or the method is the baseline): kl_window,
    reward_vs_baseline = mean over the window of reward_method(KL) - reward_baseline(KL) (curves joined
    piecewise-linearly through the points sorted by KL), gap_in_window / baseline_gap_in_window = mean frontier
    gap there, gap_closed = 1 - gap_in_window / baseline_gap_in_window.
    """
    methods = list(dict.fromkeys(r["method"] for r in rows))
    base_kl, base_reward = _curve(r for r in rows if r["method"] == baseline) if baseline in methods else (None, None)
    out: dict[str, dict[str, Any]] = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        kl, reward = _curve(mine)
        gaps = frontier_reward_at(kl, frontier_curve) - reward
        entry: dict[str, Any] = {
            "points": len(mine), "kl_min": float(kl.min()), "kl_max": float(kl.max()),
            "reward_max": float(reward.max()), "mean_frontier_gap": float(gaps.mean()),
            "kl_window": None, "reward_vs_baseline": None, "gap_in_window": None, "baseline_gap_in_window": None,
            "gap_closed": None,
        }
        if base_kl is not None and method != baseline:
            lo, hi = max(kl.min(), base_kl.min()), min(kl.max(), base_kl.max())
            if hi > lo:
                grid = np.linspace(lo, hi, 101)
                mine_r, base_r = np.interp(grid, kl, reward), np.interp(grid, base_kl, base_reward)
                best = frontier_reward_at(grid, frontier_curve)
                gap, base_gap = float((best - mine_r).mean()), float((best - base_r).mean())
                entry.update(kl_window=[float(lo), float(hi)], reward_vs_baseline=float((mine_r - base_r).mean()),
                             gap_in_window=gap, baseline_gap_in_window=base_gap,
                             gap_closed=(1.0 - gap / base_gap) if base_gap > 1e-12 else None)
        out[method] = entry
    return out


def summary_text(summary: dict[str, dict[str, Any]], baseline: str = "dpo") -> str:
    lines = []
    for method, e in summary.items():
        line = (f"- {method}: KL {e['kl_min']:.3f}-{e['kl_max']:.3f} nats, best reward {e['reward_max']:.4f}, "
                f"mean gap to the frontier {e['mean_frontier_gap']:.4f}")
        if e["reward_vs_baseline"] is not None:
            lo, hi = e["kl_window"]
            closed = "" if e["gap_closed"] is None else f", closing {100 * e['gap_closed']:.0f}% of {baseline}'s gap"
            line += (f"; at matched KL in [{lo:.3f}, {hi:.3f}] it earns {e['reward_vs_baseline']:+.4f} reward vs "
                     f"{baseline} (gap to frontier {e['gap_in_window']:.4f} vs {e['baseline_gap_in_window']:.4f}"
                     f"{closed})")
        lines.append(line + ".")
    return "\n".join(lines)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the rows."""
    head = "| method | beta | reward | KL | frontier reward at KL | gap | final loss | pair acc | steps | seconds |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['method']} | {r['beta']:g} | {r['reward']:.4f} | {r['kl']:.4f} | "
                     f"{r['frontier_reward']:.4f} | {r['frontier_gap']:.4f} | {r['final_loss']:.4f} | "
                     f"{r['pair_accuracy']:.3f} | {r['steps']} | {r['seconds']:.2f} |")
    return "\n".join(lines)


def write_outputs(rows: Sequence[dict[str, Any]], frontier_curve: tuple[Any, Any], out_dir: str | Path, *,
                  notes: str | None = None) -> dict[str, Path]:
    """Write results.csv, frontier.csv, results.md (table + summary), summary.json and frontier.png to out_dir.

    Returns {kind: path}. The plot draws every method's (KL, reward) points, joined in KL order, with the
    frontier curve; matplotlib (Agg canvas, no pyplot) is imported here only, and is not a dependency of the package:
    without it the text outputs are written, a warning is issued and "png" is absent from the result.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "results.csv", "frontier_csv": out / "frontier.csv", "markdown": out / "results.md",
             "summary": out / "summary.json", "png": out / "frontier.png"}
    with paths["csv"].open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(_ROW_FIELDS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    f_kl, f_reward = (np.asarray(a, dtype=np.float64) for a in frontier_curve)
    order = np.argsort(f_kl, kind="stable")
    with paths["frontier_csv"].open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["kl", "reward"])
        writer.writerows([[f"{f_kl[i]:.8g}", f"{f_reward[i]:.8g}"] for i in order])
    summary = summarize(rows, frontier_curve)
    paths["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    md = ["# Mallows bandit: reward vs KL", ""]
    if notes:
        md += [notes, ""]
    md += [format_table(rows), "", "## Summary", "",
           "Gap = frontier reward at the point's KL minus its reward (0 = optimal). Matched KL: each method's "
           "points joined piecewise-linearly in KL order, averaged over the KL window it shares with dpo.", "",
           summary_text(summary), ""]
    paths["markdown"].write_text("\n".join(md))

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed: frontier.png not written (pip install matplotlib)", stacklevel=2)
        del paths["png"]
        return paths
    fig = Figure(figsize=(7.5, 5.0), dpi=120)  # no pyplot: the global backend is left alone
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(f_kl[order], f_reward[order], color="black", linewidth=2, label="optimal frontier")
    markers = "osD^vP*X"
    for k, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["kl"])
        ax.plot([r["kl"] for r in mine], [r["reward"] for r in mine], marker=markers[k % len(markers)],
                linewidth=1, markersize=5, label=method)
    ax.set_xlabel("KL(pi || pi_ref), nats (mean over contexts)")
    ax.set_ylabel("expected reward")
    ax.set_title("Mallows bandit: reward-KL trade-off over the beta grid")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["png"])
    return paths


def describe_problem(problem: BanditProblem, cfg: dict[str, Any]) -> str:
    fmt = lambda a: "[" + ", ".join(f"{v:.3f}" for v in a) + "]"  # noqa: E731
    data = ("exact pair probabilities (population limit)" if cfg["population"] else
            f"{int(problem.pair_weight.sum())} sampled preference pairs ({cfg['pairs_per_context']} per context, "
            f"seed {cfg['seed']})")
    return (f"{len(problem.phis)} contexts x {problem.rewards.shape[1]} arms, rewards `{cfg['rewards']}`, reference "
            f"`{cfg['reference']}`; phi(x) = {fmt(problem.phis)}, s(x) = {fmt(problem.s_true)}, noisy s_hat(x) = "
            f"{fmt(problem.s_noisy)} (sigma {cfg['noise_sigma']}); {data}; full-batch {cfg['optimizer']} lr "
            f"{cfg['lr']}, {cfg['steps']} steps.")


# --- command line --------------------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def _names(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in METHODS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown methods {bad}; valid: {','.join(METHODS)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bandit options, so `mallows-ray bandit` can reuse them on a subparser."""
    d = DEFAULT_CONFIG
    parser.add_argument("--out", type=Path, default=Path("bandit_out"), help="output folder (default: bandit_out)")
    parser.add_argument("--steps", type=int, default=d["steps"], help=f"training steps per trial ({d['steps']})")
    parser.add_argument("--lr", type=float, default=d["lr"], help=f"learning rate ({d['lr']})")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default=d["optimizer"])
    parser.add_argument("--betas", type=_floats, default=d["betas"],
                        help="comma-separated beta grid (default: " + ",".join(f"{b:g}" for b in d["betas"]) + ")")
    parser.add_argument("--methods", type=_names, default=list(d["methods"]),
                        help=f"comma-separated, from {','.join(METHODS)} (default: {','.join(d['methods'])})")
    parser.add_argument("--seed", type=int, default=d["seed"])
    parser.add_argument("--pairs-per-context", type=int, default=d["pairs_per_context"],
                        help=f"sampled rankings (one pair each) per context ({d['pairs_per_context']})")
    parser.add_argument("--population", action="store_true",
                        help="use exact pair probabilities (infinite data) instead of samples")
    parser.add_argument("--phis", type=_floats, default=d["phis"], help="comma-separated dispersion per context")
    parser.add_argument("--arms", type=int, default=d["num_arms"])
    parser.add_argument("--rewards", choices=("linear", "random"), default=d["rewards"])
    parser.add_argument("--noise-sigma", type=float, default=d["noise_sigma"],
                        help="log-normal noise of the *_noisy methods' s(x)")
    parser.add_argument("--tune", action="store_true",
                        help="run the method x beta grid as a Ray Tune sweep (one trial each) instead of in-process")
    parser.add_argument("--address", help="Ray address for --tune (default: $RAY_ADDRESS, else a local instance)")


def run_cli(args: argparse.Namespace) -> int:
    config = {"steps": args.steps, "lr": args.lr, "optimizer": args.optimizer, "betas": args.betas,
              "methods": args.methods, "seed": args.seed, "pairs_per_context": args.pairs_per_context,
              "population": args.population,
              "phis": args.phis, "num_arms": args.arms, "rewards": args.rewards, "noise_sigma": args.noise_sigma}
    try:
        cfg = resolve_config(config)
    except ValueError as err:
        print(f"bandit: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    problem = build_problem(cfg)
    curve = _frontier_of(problem, cfg)
    if args.tune:
        from mallows_ray.tune import bandit_sweep  # Ray only on this path: the module itself stays Ray-free

        rows = bandit_sweep(cfg, Path(args.out) / "tune", address=args.address)
    else:
        rows = run_experiment(cfg, problem)
    notes = describe_problem(problem, cfg)
    paths = write_outputs(rows, curve, args.out, notes=notes)
    print(notes + "\n")
    print(format_table(rows) + "\n")
    print(summary_text(summarize(rows, curve)) + "\n")
    if "png" not in paths:
        print("note: matplotlib is missing, no plot written")
    written = ", ".join(str(p) for p in paths.values())
    print(f"{len(rows)} trials in {time.perf_counter() - start:.1f} s; wrote {written}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mallows_ray.bandit", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # [C, A] tensors: threads only cost overhead on a shared machine
    return run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
