"""The lambda scheduler: which preference weights lambda each training example gets (ALGORITHMS.md section 3.2).

A `LambdaScheduler` draws the lambdas of a batch. Modes: `fixed` (one lambda), `dirichlet` (fresh
Dirichlet(alpha) draws), `table` (user list of (lambda, prob)) and `learned`:

    p_j  = (1 - gamma) * softmax(w / temperature)_j + gamma / M       over candidates lambda_1..lambda_M
    every eval: signal_j = score_j ("performance") or score_j - previous score_j ("progress")
                w_j     += lr * (signal_j - mean_j signal_j)

with score_j by default the listwise top-1 accuracy (`LossOutput.accuracy` of the listwise losses: the share of
prompts where argmax_i r_i == argmax_i p_lambda_j[i]) of the lambda_j-conditioned model on a fixed validation
batch, as `train/lambda_training.py` computes it. `default_candidates` is the default set lambda_1..lambda_M;
`build_scheduler(mode, objectives, **params)` builds a scheduler from config values, lambdas written as
`vectors.lambda_vector` reads them.

Pure python + torch/numpy: nothing here imports ray, deepspeed or transformers.
"""

from __future__ import annotations

import inspect
import operator
from abc import ABC, abstractmethod
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from mallows_ray.lambdas.vectors import LambdaLike, check_objectives, lambda_vector, non_negative, to_simplex

DEFAULT_NUM_CANDIDATES = 16  # M of section 3.2
SIGNALS = ("performance", "progress")


# --- candidate sets (section 3.2) ---------------------------------------------------------------------------


def _dirichlet(alpha: Sequence[float], n: int, seed: int) -> Tensor:
    """n Dirichlet(alpha) draws [n, K] from numpy's seeded generator (torch has no seeded gamma sampler)."""
    draws = np.random.default_rng(seed).dirichlet(np.asarray(alpha, dtype=np.float64), size=n)
    return torch.as_tensor(draws, dtype=torch.get_default_dtype())


def default_candidates(K: int, M: int = DEFAULT_NUM_CANDIDATES, seed: int = 0) -> Tensor:
    """The default candidate set Lambda [M, K] of section 3.2: the K vertices, the uniform vector, then
    M - K - 1 Dirichlet(1) draws from numpy's default_rng(seed) (deterministic in seed)."""
    if K < 1:
        raise ValueError(f"K={K}: need at least one objective")
    if M < K + 1:
        raise ValueError(f"M={M} candidates is too few for K={K} objectives: the default set holds the {K} "
                         f"vertices and the uniform vector, so M must be at least {K + 1}")
    vertices = torch.eye(K)
    uniform = torch.full((1, K), 1.0 / K)
    return torch.cat([vertices, uniform, _dirichlet([1.0] * K, M - K - 1, seed)])


# --- schedulers (section 3.2) -------------------------------------------------------------------------------


def _simplex_rows(rows: Any, what: str, tol: float = 1e-3) -> Tensor:
    """rows [M, K] (default float dtype), each checked to lie on the simplex; errors name the row."""
    matrix = torch.as_tensor(rows, dtype=torch.float64)
    if matrix.dim() != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"{what} must be a non-empty [M, K] matrix, got shape {tuple(matrix.shape)}")
    for i, row in enumerate(matrix.tolist()):
        label = f"{what} row {i}"
        to_simplex([non_negative(label, value) for value in row], normalize=False, tol=tol, what=label)
    return matrix.to(torch.get_default_dtype())


def _positive(name: str, value: Any) -> float:
    """A finite number > 0, else an error naming the parameter."""
    number = non_negative(name, value)
    if number == 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return number


class LambdaScheduler(ABC):
    """Draws the lambda of each example (section 3.2). `sample(n, generator)` -> [n, K] rows on the simplex;
    `update(scores [M])` adapts (learned mode only); state round-trips through `state_dict`/`load_state_dict`."""

    mode: str

    @property
    @abstractmethod
    def num_objectives(self) -> int:
        """K, the length of every sampled lambda."""

    @property
    def needs_eval(self) -> bool:
        """Whether the trainer must score the candidates and call `update` (learned mode only)."""
        return False

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """n lambdas [n, K], drawn with `generator` (the same generator state gives the same draws)."""
        if isinstance(n, bool) or operator.index(n) < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        return self._draw(operator.index(n), generator)

    @abstractmethod
    def _draw(self, n: int, generator: torch.Generator) -> Tensor:
        """The mode's sampler for a validated n."""

    def probabilities(self) -> Tensor:
        """Probability of each candidate [M]; only modes with a finite candidate set have one."""
        raise NotImplementedError(f"the {self.mode!r} scheduler has no finite candidate set, so no candidate "
                                  "probabilities; modes with one: fixed, table, learned")

    def update(self, scores: Tensor) -> None:
        """Candidate scores [M] from an eval pass: ignored except in learned mode."""

    def log_dict(self) -> dict[str, float]:
        """Metrics to log: {"lambda/p_<j>": p_j} for modes with candidates, else nothing."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint state, plain python values (JSON- and torch.save-friendly)."""
        return {"mode": self.mode}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from `state_dict()`; a state saved by another mode is an error."""
        if state.get("mode") != self.mode:
            raise ValueError(f"scheduler state is for mode {state.get('mode')!r}, this scheduler is {self.mode!r}")


class _CandidateScheduler(LambdaScheduler):
    """Sampling over a finite candidate set [M, K] with `probabilities()` [M] (fixed, table, learned)."""

    def __init__(self, candidates: Any, what: str = "candidates"):
        self.candidates = _simplex_rows(candidates, what)

    @property
    def num_objectives(self) -> int:
        return self.candidates.shape[1]

    @abstractmethod
    def probabilities(self) -> Tensor:
        """p [M] (float64), summing to 1."""

    def sample_indices(self, n: int, generator: torch.Generator) -> Tensor:
        """n candidate indices [n] drawn i.i.d. from `probabilities()`; `sample` returns their rows."""
        return torch.multinomial(self.probabilities(), n, replacement=True, generator=generator)

    def _draw(self, n: int, generator: torch.Generator) -> Tensor:
        return self.candidates[self.sample_indices(n, generator)]

    def log_dict(self) -> dict[str, float]:
        return {f"lambda/p_{j}": p for j, p in enumerate(self.probabilities().tolist())}


class FixedScheduler(_CandidateScheduler):
    """Mode `fixed`: every example gets the same lambda [K] (a one-candidate set with p = 1)."""

    mode = "fixed"

    def __init__(self, lam: Sequence[float] | Tensor):
        super().__init__(torch.as_tensor(lam, dtype=torch.float64)[None], "lam")

    def probabilities(self) -> Tensor:
        return torch.ones(1, dtype=torch.float64)


class TableScheduler(_CandidateScheduler):
    """Mode `table`: lambda_j [M, K] drawn with the user's probabilities p [M] (both checked on the simplex)."""

    mode = "table"

    def __init__(self, lambdas: Sequence[Sequence[float]] | Tensor, probs: Sequence[float] | Tensor):
        super().__init__(lambdas, "lambdas")
        probs = [non_negative(f"probs[{j}]", p) for j, p in enumerate(probs)]
        if len(probs) != len(self.candidates):
            raise ValueError(f"probs has {len(probs)} entries for {len(self.candidates)} lambdas; give one each")
        self._probs = torch.tensor(to_simplex(probs, normalize=False, tol=1e-3, what="probs"), dtype=torch.float64)

    def probabilities(self) -> Tensor:
        return self._probs.clone()


class DirichletScheduler(LambdaScheduler):
    """Mode `dirichlet`: a fresh lambda ~ Dirichlet(alpha) per example; alpha a positive scalar or K values."""

    mode = "dirichlet"

    def __init__(self, alpha: float | Sequence[float], num_objectives: int):
        alphas = [alpha] * num_objectives if isinstance(alpha, (int, float)) else list(alpha)
        if len(alphas) != num_objectives:
            raise ValueError(f"alpha has {len(alphas)} values for {num_objectives} objectives; give one or K")
        self.alpha = tuple(_positive(f"alpha[{k}]", a) for k, a in enumerate(alphas))

    @property
    def num_objectives(self) -> int:
        return len(self.alpha)

    def _draw(self, n: int, generator: torch.Generator) -> Tensor:
        """Dirichlet draws seeded from `generator` (one int64 draw), so the generator state fixes them."""
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
        return _dirichlet(self.alpha, n, seed)


class LearnedScheduler(_CandidateScheduler):
    """Mode `learned` (section 3.2): p_j = (1 - gamma) softmax(w / temperature)_j + gamma / M over candidates
    [M, K]; `update(scores)` does w_j += lr * (signal_j - mean signal), signal = score ("performance") or
    score - previous score ("progress"). The first "progress" update has no previous score: it only records the
    scores and leaves w unchanged (using 0 as the previous score would make it a "performance" step).
    gamma = `exploration` is the floor: every p_j >= gamma / M whatever w becomes. w starts at 0 (uniform)."""

    mode = "learned"

    def __init__(self, candidates: Sequence[Sequence[float]] | Tensor, *, temperature: float = 1.0,
                 lr: float = 1.0, exploration: float = 0.1, signal: str = "performance"):
        super().__init__(candidates)
        self.temperature = _positive("temperature", temperature)
        self.lr = non_negative("lr", lr)
        self.exploration = non_negative("exploration", exploration)
        if self.exploration > 1:
            raise ValueError(f"exploration (gamma) must be in [0, 1], got {exploration!r}")
        if signal not in SIGNALS:
            raise ValueError(f"unknown signal {signal!r}; valid signals: {', '.join(SIGNALS)}")
        self.signal = signal
        self.weights = torch.zeros(len(self.candidates), dtype=torch.float64)  # w [M]
        self.previous_scores: Tensor | None = None  # [M], scores of the last update
        self.steps = 0  # number of updates

    @property
    def needs_eval(self) -> bool:
        return True

    def probabilities(self) -> Tensor:
        gamma, m = self.exploration, len(self.weights)
        return (1 - gamma) * torch.softmax(self.weights / self.temperature, dim=0) + gamma / m

    def update(self, scores: Tensor) -> None:
        """One step of section 3.2 from candidate scores [M] (higher is better)."""
        scores = torch.as_tensor(scores, dtype=torch.float64).detach().clone()
        if scores.shape != self.weights.shape or not torch.isfinite(scores).all():
            raise ValueError(f"scores must be {len(self.weights)} finite values (one per candidate), "
                             f"got {scores.tolist()}")
        if self.signal == "performance":
            signal = scores
        elif self.previous_scores is not None:
            signal = scores - self.previous_scores
        else:
            signal = None  # first "progress" update: nothing to compare against yet
        if signal is not None:
            self.weights += self.lr * (signal - signal.mean())
        self.previous_scores = scores
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        """w, the previous scores, the step count, and the candidates (checked on load)."""
        return {
            **super().state_dict(),
            "candidates": self.candidates.tolist(),
            "weights": self.weights.tolist(),
            "previous_scores": None if self.previous_scores is None else self.previous_scores.tolist(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        saved = torch.as_tensor(state["candidates"], dtype=self.candidates.dtype)
        if saved.shape != self.candidates.shape or not torch.equal(saved, self.candidates):
            raise ValueError(f"scheduler state was saved with other candidates (shape {tuple(saved.shape)}) "
                             f"than this scheduler's (shape {tuple(self.candidates.shape)})")
        self.weights = torch.tensor(state["weights"], dtype=torch.float64)
        previous = state["previous_scores"]
        self.previous_scores = None if previous is None else torch.tensor(previous, dtype=torch.float64)
        self.steps = int(state["steps"])


# --- factory ------------------------------------------------------------------------------------------------


def _lambda_rows(specs: Sequence[LambdaLike], objectives: Sequence[str], what: str) -> list[tuple[float, ...]]:
    """Each lambda spec (string, mapping or K numbers) as K floats; errors name the entry."""
    rows = []
    for i, spec in enumerate(specs):
        try:
            rows.append(lambda_vector(spec, objectives))
        except ValueError as err:
            raise ValueError(f"{what} entry {i}: {err}") from None
    return rows


def _build_fixed(objectives: Sequence[str], *, lam: LambdaLike) -> FixedScheduler:
    return FixedScheduler(lambda_vector(lam, objectives))


def _build_dirichlet(objectives: Sequence[str], *, alpha: float | Sequence[float] = 1.0) -> DirichletScheduler:
    return DirichletScheduler(alpha, len(objectives))


def _build_table(objectives: Sequence[str], *, lambdas: Sequence[LambdaLike],
                 probs: Sequence[float] | None = None) -> TableScheduler:
    """probs default: uniform over the listed lambdas."""
    rows = _lambda_rows(lambdas, objectives, "lambdas")
    return TableScheduler(rows, [1.0 / len(rows)] * len(rows) if probs is None else probs)


def _build_learned(objectives: Sequence[str], *, candidates: Sequence[LambdaLike] | None = None,
                   num_candidates: int = DEFAULT_NUM_CANDIDATES, seed: int = 0, **hyper: Any) -> LearnedScheduler:
    """candidates default: `default_candidates(K, num_candidates, seed)`; `hyper` goes to LearnedScheduler."""
    if candidates is None:
        rows = default_candidates(len(objectives), num_candidates, seed)
    else:
        rows = _lambda_rows(candidates, objectives, "candidates")
    return LearnedScheduler(rows, **hyper)


# mode -> (builder, scheduler class whose keyword-only parameters the builder forwards through **kwargs)
_MODES: dict[str, tuple[Callable[..., LambdaScheduler], type[LambdaScheduler] | None]] = {
    "fixed": (_build_fixed, None),
    "dirichlet": (_build_dirichlet, None),
    "table": (_build_table, None),
    "learned": (_build_learned, LearnedScheduler),
}


def _keyword_only(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """fn's keyword-only parameters by name."""
    return {p.name: p for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}


def _lookup(mode: str) -> tuple[Callable[..., LambdaScheduler], type[LambdaScheduler] | None]:
    """The (builder, forwarded class) of a mode, or an error listing the valid modes."""
    if mode not in _MODES:
        raise ValueError(f"unknown lambda scheduler mode {mode!r}; valid modes: {', '.join(_MODES)}")
    return _MODES[mode]


def scheduler_parameters(mode: str) -> list[str]:
    """The parameter names `build_scheduler(mode, ...)` accepts (for config validation and Tune spaces)."""
    builder, forwarded = _lookup(mode)
    names = list(_keyword_only(builder))
    return names + (list(_keyword_only(forwarded.__init__)) if forwarded else [])


def build_scheduler(mode: str, objectives: Sequence[str], **params: Any) -> LambdaScheduler:
    """The scheduler for `mode` (section 3.2) over `objectives`, lambdas given as strings, mappings or lists.

    fixed: lam | dirichlet: alpha=1.0 | table: lambdas, probs=None (uniform) |
    learned: candidates=None (default set), num_candidates=16, seed=0, temperature, lr, exploration, signal.
    """
    builder, _ = _lookup(mode)
    names = check_objectives(objectives)
    valid = scheduler_parameters(mode)
    unknown = [key for key in params if key not in valid]
    if unknown:
        raise ValueError(f"lambda scheduler mode {mode!r} has no parameter {unknown[0]!r}; "
                         f"valid parameters: {', '.join(valid)}")
    missing = [p.name for p in _keyword_only(builder).values() if p.default is p.empty and p.name not in params]
    if missing:
        raise ValueError(f"lambda scheduler mode {mode!r} needs parameter {', '.join(missing)}")
    return builder(names, **params)
