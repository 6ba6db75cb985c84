"""What a listwise run adds to the worker loop, as one object: the lambda scheduler, the conditioner, the
learned scheduler's update cadence and its state (ALGORITHMS 3.1-3.2). Pairwise losses get the null version,
so the loop reads top to bottom with no mode branches:

    rows = training.step_rows(rows, n, step, rank, world)   # lambdas drawn for the global batch, then sliced
    for micro in step_micro_batches(rows, config, training.copies): ...  # a prompt's copies stay together
    training.after_step(engine, step)                       # learned scheduler: score candidates, update
    training.evaluate(engine, batches)                      # per-lambda passes (listwise) or one pass
    training.state_dict() / load_state_dict(saved)          # in the checkpoint, back on resume
    training.describe()                                     # the export's conditioning settings (or None)
"""

from __future__ import annotations

from typing import Any

import torch

from mallows_ray.config import Config
from mallows_ray.data.scored_split import ScoredSplit
from mallows_ray.lambdas.schedulers import LambdaScheduler
from mallows_ray.train.batches import Row, rank_slice
from mallows_ray.train.conditioning import (
    Conditioner,
    build_lambda_scheduler,
    copies_per_prompt,
    evaluation_lambdas,
    step_lambdas,
    training_rows,
)
from mallows_ray.train.evaluation import EvalSettings, evaluate_rows, evaluate_under_lambdas
from mallows_ray.train.metrics import COUNTS
from mallows_ray.train.plan import TrainPlan


class PairwiseTraining:
    """The null version: rows train as they are, one evaluation pass, nothing to save or export."""

    copies = 1  # rows per prompt in a micro-batch

    def __init__(self, settings: EvalSettings):
        self.settings = settings

    def step_rows(self, rows: list[Row], global_size: int, step: int, rank: int, world: int) -> list[Row]:
        return rows

    def after_step(self, engine, step: int) -> None:
        pass

    def log_dict(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        pass

    def evaluate(self, engine, batches: list[list[Row]]) -> dict[str, float]:
        """Metrics of the validation split's global `batches` (unprefixed)."""
        return evaluate_rows(engine, batches, self.settings)

    def describe(self) -> dict[str, Any] | None:
        return None


class ListwiseTraining(PairwiseTraining):
    """Each prompt of a global batch gets a lambda [K] from the scheduler (drawn for the whole global batch from
    (run.seed, step), then sliced by rank) and, with `lambdas.condition`, a policy prompt with lambda rendered
    in; with `vertex_copies` it trains K (+ 1) times, once under each vertex (and its draw)."""

    def __init__(self, settings: EvalSettings, config: Config, conditioner: Conditioner, scheduler: LambdaScheduler,
                 update_rows: list[Row]):
        super().__init__(settings)
        self.cfg, self.seed = config.lambdas, config.run.seed
        self.conditioner, self.scheduler = conditioner, scheduler
        self.copies = copies_per_prompt(self.cfg, len(conditioner.objectives))
        # learned scheduler: optimizer steps between candidate evaluations (0: never), on a fixed batch of rows
        self.update_every = (self.cfg.update_every or config.run.eval_every) if scheduler.needs_eval else 0
        if scheduler.needs_eval and self.update_every == 0:
            raise ValueError("the learned lambda scheduler needs lambdas.update_every or run.eval_every > 0")
        self.update_rows = update_rows

    def step_rows(self, rows: list[Row], global_size: int, step: int, rank: int, world: int) -> list[Row]:
        """This rank's rows of global batch `step` under their lambdas: the draws [global_size, K] are made for
        the whole global batch, so every rank (and a resumed run) draws the same ones."""
        lambdas = step_lambdas(self.scheduler, global_size, seed=self.seed, step=step)
        return training_rows(self.conditioner, rows, rank_slice(lambdas.tolist(), rank, world), self.cfg)

    def after_step(self, engine, step: int) -> None:
        if self.update_every and step % self.update_every == 0:  # identical update on every rank
            self.scheduler.update(self._score_candidates(engine))

    def _score_candidates(self, engine) -> torch.Tensor:
        """score_j [M] of ALGORITHMS 3.2: the top-1 listwise accuracy of the lambda_j-conditioned policy against
        p_lambda_j on the fixed batch `update_rows`."""
        candidates = {str(j): lam for j, lam in enumerate(self.scheduler.candidates.tolist())}
        engine.eval()
        per_lambda = evaluate_under_lambdas(engine, lambda: [self.update_rows], candidates, self.conditioner,
                                            self.settings)
        engine.train()
        return torch.tensor([per_lambda[j]["rewards/accuracy"] for j in candidates], dtype=torch.float64)

    def log_dict(self) -> dict[str, float]:
        return self.scheduler.log_dict()

    def state_dict(self) -> dict[str, Any]:
        return {"lambda_scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if "lambda_scheduler" in saved:
            self.scheduler.load_state_dict(saved["lambda_scheduler"])

    def evaluate(self, engine, batches: list[list[Row]]) -> dict[str, float]:
        """With `lambdas.eval_vertices` under each objective's vertex (`<objective>/...`), with `eval_uniform`
        under the uniform lambda (`uniform/...`); unprefixed: the uniform pass's, else the mean over the
        vertices."""
        lambdas = evaluation_lambdas(self.conditioner.objectives, vertices=self.cfg.eval_vertices,
                                     uniform=self.cfg.eval_uniform)
        per_lambda = evaluate_under_lambdas(engine, lambda: batches, lambdas, self.conditioner, self.settings)
        metrics = {f"{name}/{key}": value for name, values in per_lambda.items()
                   for key, value in values.items() if key not in COUNTS}
        passes = [per_lambda["uniform"]] if "uniform" in per_lambda else list(per_lambda.values())
        metrics.update({key: sum(p[key] for p in passes) / len(passes) for key in passes[0]})
        return metrics

    def describe(self) -> dict[str, Any] | None:
        return self.conditioner.describe()


def lambda_training(config: Config, settings: EvalSettings, tokenizer, plan: TrainPlan,
                    train: ScoredSplit) -> PairwiseTraining | ListwiseTraining:
    """The run's lambda training: listwise for a listwise loss, else the null version. The learned scheduler's
    fixed batch is the first `lambdas.update_prompts` rows of the validation split (else of `train`): every
    rank reads the same rows."""
    if not settings.loss.listwise:
        return PairwiseTraining(settings)
    scheduler = build_lambda_scheduler(config.lambdas, plan.objectives)
    update_rows = []
    if scheduler.needs_eval:
        fixed = plan.open_split("validation") if plan.has_validation else train
        update_rows = fixed.take(range(min(config.lambdas.update_prompts, len(fixed))))
    conditioner = Conditioner.from_config(tokenizer, plan.objectives, config.lambdas)
    return ListwiseTraining(settings, config, conditioner, scheduler, update_rows)
