"""Lambda in listwise training (ALGORITHMS 3.1-3.2): which lambda each example gets and how it reaches the
policy's prompt.

Determinism: the lambdas of global batch `step` are drawn for the whole global batch, from a generator seeded
by (run.seed, step), before the batch is sliced by rank. Every rank draws the same lambdas, a resumed or
restarted run draws the same ones again, and 1 worker x accumulation 2 trains on the lambdas of 2 workers x 1.

Vertex copies (`lambdas.vertex_copies`): every prompt of the global batch is trained K + 1 times, under each
objective's vertex lambda and under its scheduler draw (K times, the vertices only, with `lambdas.copy_draw`
false), in the same micro-batch. The loss then compares the same replies under different lambdas within one
gradient, which is the signal that teaches the policy to read lambda (a single draw per prompt leaves
lambda's effect confounded with the prompt's). The copies are made after the rank slice from the globally
drawn lambdas, so determinism and world-size invariance are kept.

The reference log-probs in the rows were scored on the unconditioned prompt and stay as they are: the KL
anchor is the base model's behaviour for every lambda (section 3.1), so conditioning only swaps the policy's
prompt ids.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from mallows_ray.config import LambdaConfig
from mallows_ray.data.tokenize import conditioned_prompt_ids
from mallows_ray.lambdas.schedulers import LambdaScheduler, build_scheduler
from mallows_ray.lambdas.vectors import lambda_vector

Row = dict[str, Any]

class Conditioner:
    """Gives rows their lambda [K] and, with `condition`, the policy prompt ids with lambda rendered in."""

    def __init__(self, tokenizer, objectives: Sequence[str], *, condition: bool = True, placement: str = "system"):
        if not objectives:
            raise ValueError("lambda conditioning needs the data's objective names; the scored data has none "
                             "(listwise data carries scores: {objective: [N numbers]})")
        self.tokenizer = tokenizer
        self.objectives = list(objectives)
        self.condition = condition
        self.placement = placement

    @classmethod
    def from_config(cls, tokenizer, objectives: Sequence[str], cfg: LambdaConfig) -> "Conditioner":
        return cls(tokenizer, objectives, condition=cfg.condition, placement=cfg.placement)

    def apply(self, rows: list[Row], lambdas: torch.Tensor | Sequence[Sequence[float]]) -> list[Row]:
        """New rows (inputs untouched): row i gets `lambda` = lambdas[i] [K] and, when conditioning, its
        prompt_ids re-rendered from its prompt messages with that lambda."""
        out = []
        lambdas = lambdas.tolist() if isinstance(lambdas, torch.Tensor) else [list(map(float, lam)) for lam in lambdas]
        for row, lam in zip(rows, lambdas, strict=True):
            new = dict(row, **{"lambda": lam})
            if self.condition:
                new["prompt_ids"] = conditioned_prompt_ids(self.tokenizer, list(row["prompt"]), list(row["prompt_ids"]),
                                                           lam, self.objectives, placement=self.placement)
            out.append(new)
        return out

    def apply_one(self, rows: list[Row], lam: Sequence[float]) -> list[Row]:
        """Every row under the same lambda [K] (evaluation, candidate scoring)."""
        return self.apply(rows, [list(lam)] * len(rows))

    def describe(self) -> dict[str, Any]:
        """The settings an export records in CONDITIONING_FILE."""
        return {"objectives": self.objectives, "condition": self.condition, "placement": self.placement}


def build_lambda_scheduler(cfg: LambdaConfig, objectives: Sequence[str]) -> LambdaScheduler:
    try:
        return build_scheduler(cfg.scheduler, objectives, **cfg.params)
    except (ValueError, TypeError) as err:
        raise ValueError(f"lambdas.params for the {cfg.scheduler!r} scheduler over objectives "
                         f"{list(objectives)}: {err}") from None


def step_lambdas(scheduler: LambdaScheduler, n: int, *, seed: int, step: int) -> torch.Tensor:
    """The lambdas [n, K] of the n prompts of global batch `step` (0-based): a function of (seed, step) and
    the scheduler's state only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return scheduler.sample(n, generator)


def vertex_copies(rows: list[Row], draws: Sequence[Sequence[float]], num_objectives: int, *,
                  with_draw: bool = True) -> tuple[list[Row], list[list[float]]]:
    """(rows, lambdas) with each row repeated C = K + 1 times: under the K vertex lambdas (objective order), then
    under its own draw [K] (C = K without `with_draw`). Row i's copies are rows i * C ... i * C + C - 1, so a
    micro-batch of `micro_batch_size * C` rows holds whole prompts."""
    vertices = torch.eye(num_objectives).tolist()
    out_rows, out_lambdas = [], []
    for row, draw in zip(rows, draws, strict=True):
        lambdas = [*vertices, list(map(float, draw))] if with_draw else vertices
        out_rows += [row] * len(lambdas)
        out_lambdas += lambdas
    return out_rows, out_lambdas


def copies_per_prompt(cfg: LambdaConfig, num_objectives: int) -> int:
    """Rows a prompt becomes in training: 1, or K (+ 1 with its draw) with `vertex_copies`."""
    return num_objectives + cfg.copy_draw if cfg.vertex_copies else 1


def training_rows(conditioner: Conditioner, rows: list[Row], draws: Sequence[Sequence[float]],
                  cfg: LambdaConfig) -> list[Row]:
    """A rank's training rows of one step: each row under its drawn lambda [K], or under every vertex and its
    draw (`vertex_copies`, `copy_draw`)."""
    if cfg.vertex_copies:
        return conditioner.apply(*vertex_copies(rows, draws, len(conditioner.objectives), with_draw=cfg.copy_draw))
    return conditioner.apply(rows, draws)


def evaluation_lambdas(objectives: Sequence[str], *, vertices: bool = True,
                       uniform: bool = True) -> dict[str, tuple[float, ...]]:
    """The lambdas an eval pass reports, keyed by metric name: each objective's vertex with `vertices`, the
    uniform vector ("uniform") with `uniform` (`lambdas.eval_vertices` / `lambdas.eval_uniform`)."""
    k = len(objectives)
    named = {name: lambda_vector({name: 1.0}, objectives) for name in objectives} if vertices else {}
    return {**named, "uniform": tuple([1.0 / k] * k)} if uniform else named
