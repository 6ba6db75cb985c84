"""From a micro-batch to the loss: one policy forward, then the loss's inputs (pairwise or listwise).

Training and evaluation both call `forward_loss`; pairwise and listwise losses share the packing and the
forward and differ only in how the [B, N] per-response values are handed to the loss.
"""

from __future__ import annotations

from typing import Callable

import torch

from mallows_ray.losses import ListwiseInputs, LossOutput, PairwiseInputs, mixed_target
from mallows_ray.train.batches import Batch

# Softmax temperature of the per-objective targets (ALGORITHMS 3); configurable with the lambda scheduler.
TARGET_TAU = 1.0


def uniform_lambda_target(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """p_lambda [B, N] with lambda uniform over the K objectives (lambda sampling comes with the scheduler)."""
    lambdas = scores.new_full(scores.shape[:2], 1.0 / scores.shape[1])  # [B, K]
    return mixed_target(scores, lambdas, TARGET_TAU, response_mask)


def loss_inputs(batch: Batch, policy_logps: torch.Tensor, listwise: bool) -> PairwiseInputs | ListwiseInputs:
    """policy_logps [B, N] lp(y); pairwise rows hold [chosen, rejected] in that order."""
    lengths = batch.response_lengths()  # [B, N]
    if listwise:
        return ListwiseInputs(policy_logps, batch.reference_logps, lengths,
                              uniform_lambda_target(batch.scores, batch.response_mask),
                              batch.response_mask, batch.dispersion)
    return PairwiseInputs(policy_logps[:, 0], policy_logps[:, 1], batch.reference_logps[:, 0],
                          batch.reference_logps[:, 1], lengths[:, 0], lengths[:, 1], batch.dispersion)


def forward_loss(model: Callable[..., torch.Tensor], batch: Batch,
                 loss_fn: Callable[[PairwiseInputs | ListwiseInputs], LossOutput], listwise: bool) -> LossOutput:
    """`model` maps (input_ids, attention_mask, labels) [R, T] to lp(y) [R] (the DeepSpeed engine)."""
    packed = batch.packed
    logps = model(packed.input_ids, packed.attention_mask, packed.labels)  # [R] sum of response log-probs
    return loss_fn(loss_inputs(batch, batch.grid(logps), listwise))          # losses [B]
