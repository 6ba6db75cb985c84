"""From a micro-batch to the loss: one policy forward, then the loss's inputs (pairwise or listwise).

Training and evaluation both call `forward_loss`; pairwise and listwise losses share the packing and the
forward and differ only in how the [B, N] per-response values are handed to the loss.
"""

from __future__ import annotations

from typing import Callable

import torch

from mallows_ray.losses import ListwiseInputs, LossOutput, PairwiseInputs, mixed_target
from mallows_ray.train.batches import Batch

def loss_inputs(batch: Batch, policy_logps: torch.Tensor, listwise: bool,
                target_tau: float = 1.0) -> PairwiseInputs | ListwiseInputs:
    """policy_logps [B, N] lp(y); pairwise rows hold [chosen, rejected] in that order; listwise rows carry
    their lambda [B, K], which mixes the per-objective targets softmax(S_k / tau) into p_lambda [B, N]."""
    lengths = batch.response_lengths()  # [B, N]
    if listwise:
        target = mixed_target(batch.scores, batch.lambdas, target_tau, batch.response_mask)
        return ListwiseInputs(policy_logps, batch.reference_logps, lengths, target,
                              batch.response_mask, batch.dispersion)
    return PairwiseInputs(policy_logps[:, 0], policy_logps[:, 1], batch.reference_logps[:, 0],
                          batch.reference_logps[:, 1], lengths[:, 0], lengths[:, 1], batch.dispersion)


def forward_loss(model: Callable[..., torch.Tensor], batch: Batch,
                 loss_fn: Callable[[PairwiseInputs | ListwiseInputs], LossOutput], listwise: bool,
                 target_tau: float = 1.0) -> LossOutput:
    """`model` maps `PackedResponses.model_inputs()` to lp(y) [R] (the DeepSpeed engine)."""
    logps = model(**batch.packed.model_inputs())  # [R] sum of response log-probs
    return loss_fn(loss_inputs(batch, batch.grid(logps), listwise, target_tau))  # losses [B]
