"""Evaluation passes: the loss and reward metrics of a policy over batches of scored rows, and the listwise
metrics under given lambdas. Used by the training loop (sharded over ranks, one all-reduce per pass) and by
`mallows-ray eval` (one process: rank 0 of 1, `drivers/evaluate.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Callable, Iterable, Mapping, Sequence

import torch

from mallows_ray.losses import Loss
from mallows_ray.train.batches import Row, budget_micro_batches, collate, eval_slice
from mallows_ray.train.conditioning import Conditioner
from mallows_ray.train.metrics import MetricSums
from mallows_ray.train.objective import forward_loss


@dataclass(frozen=True)
class EvalSettings:
    """How an evaluation pass batches and scores rows: this rank's place, the loss and the batch layout."""

    loss: Loss
    pad_id: int
    rank: int = 0
    world: int = 1
    target_tau: float = 1.0  # tau of the listwise targets softmax(S_k / tau)
    share_prompt: bool = False
    pack: bool = False
    device: torch.device | None = None
    max_tokens: int = 0  # > 0: a rank's rows of a batch run in forwards of at most this many positions


def evaluate_rows(model: Callable[..., torch.Tensor], global_batches: Iterable[list[Row]], settings: EvalSettings,
                  transform: Callable[[list[Row]], list[Row]] | None = None) -> dict[str, float]:
    """Metrics (as `MetricSums.reduce`) of `model` over every row of `global_batches`; rank r runs its
    `eval_slice` of each batch. `transform` maps a rank's rows before collation (e.g. lambda conditioning).
    Collective when torch.distributed is initialised: all ranks must see the same batches."""
    sums = MetricSums()
    with torch.no_grad():
        for global_rows in global_batches:
            rows, count = eval_slice(global_rows, settings.rank, settings.world)  # every rank: same forwards
            if transform is not None:
                rows = transform(rows)
            for part, part_count in forward_parts(rows, count, settings):
                batch = collate(part, settings.pad_id, with_scores=settings.loss.listwise,
                                share_prompt=settings.share_prompt, pack=settings.pack)
                if settings.device is not None:
                    batch = batch.to(settings.device)
                out = forward_loss(model, batch, settings.loss, settings.target_tau)
                sums.add_loss_output(out, batch.dispersion, part_count)
    return sums.reduce()


def forward_parts(rows: list[Row], count: int, settings: EvalSettings) -> list[tuple[list[Row], int]]:
    """A rank's `rows` of an evaluation batch (the first `count` real, see `eval_slice`) as forwards, each with
    how many of its rows count: one forward, or with `settings.max_tokens` forwards of at most that many
    positions, as many as on the rank that needs the most (collective, as training's micro-batches)."""
    if settings.max_tokens == 0:
        return [(rows, count)]
    parts = budget_micro_batches(rows, settings.max_tokens, group=1, share_prompt=settings.share_prompt,
                                 pack=settings.pack)
    starts = accumulate(map(len, parts), initial=0)  # each part's first row in `rows`
    return [(part, min(len(part), max(0, count - start))) for part, start in zip(parts, starts)]


def evaluate_under_lambdas(model: Callable[..., torch.Tensor], batches: Callable[[], Iterable[list[Row]]],
                           lambdas: Mapping[str, Sequence[float]], conditioner: Conditioner,
                           settings: EvalSettings) -> dict[str, dict[str, float]]:
    """{name: metrics} of `evaluate_rows` with every row conditioned on lambdas[name]. For a vertex lambda,
    `rewards/accuracy` is the listwise top-1 accuracy and `loss` the listwise loss of that objective alone.
    `batches()` gives a fresh iterable of the same global batches for each lambda."""
    return {name: evaluate_rows(model, batches(), settings,
                                transform=lambda rows, lam=lam: conditioner.apply_one(rows, lam))
            for name, lam in lambdas.items()}
