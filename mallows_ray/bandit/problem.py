"""The bandit problem: rewards, reference, dispersions and Mallows preference pairs; policy value and the frontier.

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
- Evaluation of a policy (`policy_value`): expected reward E_x E_{a~pi}[r(x, a)] and KL(pi || pi_ref) averaged
  over contexts (contexts uniform, KL in nats).
- The optimal reward-KL frontier (`frontier`): max E[r] - eta * KL is attained by pi*(a|x) ∝ pi_ref(a|x)
  exp(r(x, a) / eta), with ONE eta for every context; sweeping eta traces the best reward at each KL. No policy
  lies above it. DPO fits a Bradley-Terry reward of roughly s(x) * (rank score) / beta, i.e. it tilts concentrated
  contexts harder than dispersed ones, an eta that differs per context, which is off the frontier when contexts
  are equally valuable. MallowsPO-theta divides that s(x) out (approximately: logit g_phi(d) is not exactly
  s * d); MallowsPO-phi fits g_phi(beta * u) = g_phi(d), whose population optimum is beta * (h_a - h_b) = rank gap
  exactly, on the frontier for "linear" rewards. Finite data and finite steps keep every method below it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mallows_ray.bandit.config import BanditConfig
from mallows_ray.losses import kendall_link

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
    if spec == "linear":
        levels = 1.0 - np.arange(num_arms) / (num_arms - 1)
        return np.stack([levels[np.argsort(rng.permutation(num_arms))] for _ in range(num_contexts)])
    if spec == "random":
        return rng.uniform(0.0, 1.0, size=(num_contexts, num_arms))
    rewards = np.asarray(spec, dtype=np.float64)
    if rewards.shape != (num_contexts, num_arms):
        raise ValueError(f"rewards must have shape [{num_contexts}, {num_arms}], got {list(rewards.shape)}")
    return rewards


def _reference(spec: Any, num_contexts: int, num_arms: int) -> np.ndarray:
    if spec == "uniform":
        return np.full((num_contexts, num_arms), 1.0 / num_arms)
    ref = np.asarray(spec, dtype=np.float64)
    if ref.shape != (num_contexts, num_arms) or (ref <= 0).any() or not np.allclose(ref.sum(1), 1.0, atol=1e-6):
        raise ValueError(f"reference must be [{num_contexts}, {num_arms}] positive probabilities, rows summing to 1")
    return ref / ref.sum(1, keepdims=True)


def _population_pairs(phis: np.ndarray, central: np.ndarray) -> np.ndarray:
    """[C, A, A] probability that a random pair is (winner, loser): 1/#pairs * g_phi(d) or 1 - g_phi(d)."""
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


def build_problem(cfg: BanditConfig) -> BanditProblem:
    """Rewards, reference, dispersions and the preference pairs; a pure function of the config.

    With cfg.population the pairs are not sampled: every ordered pair carries its exact probability under the
    model (the infinite-data limit), which isolates the effect of dispersion from sampling noise.
    """
    phis = np.asarray(cfg.phis, dtype=np.float64)
    num_contexts, num_arms, n = len(phis), cfg.num_arms, cfg.pairs_per_context
    seeds = np.random.SeedSequence(cfg.seed).spawn(3)
    reward_rng, data_rng, noise_rng = (np.random.default_rng(s) for s in seeds)
    rewards = _rewards(cfg.rewards, num_contexts, num_arms, reward_rng)
    reference = _reference(cfg.reference, num_contexts, num_arms)
    central = np.argsort(-rewards, axis=1, kind="stable")
    counts = np.zeros((num_contexts, num_arms, num_arms), dtype=np.float64)  # [x, winner, loser]
    if cfg.population:
        counts = _population_pairs(phis, central)
    for x in range(0 if cfg.population else num_contexts):
        order = sample_mallows_kendall(num_arms, phis[x], n, data_rng)
        rank = np.argsort(order, axis=1)  # rank[k, item]
        i = data_rng.integers(num_arms, size=n)
        j = data_rng.integers(num_arms - 1, size=n)
        j = j + (j >= i)  # a uniform pair of distinct arms
        rows = np.arange(n)
        i_wins = rank[rows, i] < rank[rows, j]
        winner, loser = np.where(i_wins, i, j), np.where(i_wins, j, i)
        np.add.at(counts[x], (central[x][winner], central[x][loser]), 1)
    ctx, win, lose = np.nonzero(counts)
    s_true = -np.log(phis)
    s_noisy = s_true * np.exp(cfg.noise_sigma * noise_rng.standard_normal(num_contexts))
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


def problem_frontier(problem: BanditProblem, cfg: BanditConfig) -> tuple[np.ndarray, np.ndarray]:
    """The frontier of `problem` at cfg.etas (default_etas() when unset)."""
    return frontier(problem.rewards, problem.reference, default_etas() if cfg.etas is None else cfg.etas)


def frontier_reward_at(kl: Any, frontier_curve: tuple[Any, Any]) -> np.ndarray:
    """Best achievable reward at the given KL(s): the frontier interpolated linearly, flat past its ends."""
    f_kl, f_reward = (np.asarray(a, dtype=np.float64) for a in frontier_curve)
    order = np.argsort(f_kl, kind="stable")
    return np.interp(np.asarray(kl, dtype=np.float64), f_kl[order], f_reward[order])
