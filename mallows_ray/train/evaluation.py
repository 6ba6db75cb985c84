"""Evaluation passes: the loss and reward metrics of a policy over batches of scored rows, and the listwise
metrics under given lambdas. Used by the training loop (sharded over ranks, one all-reduce per pass) and by
`mallows-ray eval` (one process: rank 0 of 1, `drivers/evaluate.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch

from mallows_ray.losses import Loss
from mallows_ray.train.batches import Row, collate, eval_slice
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
            batch = collate(rows, settings.pad_id, with_scores=settings.loss.listwise,
                            share_prompt=settings.share_prompt, pack=settings.pack)
            if settings.device is not None:
                batch = batch.to(settings.device)
            out = forward_loss(model, batch, settings.loss, settings.target_tau)
            sums.add_loss_output(out, batch.dispersion, count)
    return sums.reduce()


def evaluate_under_lambdas(model: Callable[..., torch.Tensor], batches: Callable[[], Iterable[list[Row]]],
                           lambdas: Mapping[str, Sequence[float]], conditioner: Conditioner,
                           settings: EvalSettings) -> dict[str, dict[str, float]]:
    """{name: metrics} of `evaluate_rows` with every row conditioned on lambdas[name]. For a vertex lambda,
    `rewards/accuracy` is the listwise top-1 accuracy and `loss` the listwise loss of that objective alone.
    `batches()` gives a fresh iterable of the same global batches for each lambda."""
    return {name: evaluate_rows(model, batches(), settings,
                                transform=lambda rows, lam=lam: conditioner.apply_one(rows, lam))
            for name, lam in lambdas.items()}
