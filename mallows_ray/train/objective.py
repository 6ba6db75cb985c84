"""From a micro-batch to the loss: one policy forward, then the loss's inputs (pairwise or listwise).

Training and evaluation both call `forward_loss`; pairwise and listwise losses share the packing and the
forward and differ only in how the [B, N] per-response values are handed to the loss.
"""

from __future__ import annotations

from typing import Callable

import torch

from mallows_ray.losses import ListwiseInputs, LossOutput, PairwiseInputs, ResponseStats, mixed_target
from mallows_ray.train.batches import Batch

def policy_outputs(stats: ResponseStats, with_wpo: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """What the policy forward returns: lp(y) [R], or with WPO (lp(y) [R], aligned mean log-prob a(y) [R])."""
    return (stats.logp_sum, stats.aligned_logp_mean) if with_wpo else stats.logp_sum


def loss_inputs(batch: Batch, policy_logps: torch.Tensor, listwise: bool, target_tau: float = 1.0,
                aligned: torch.Tensor | None = None) -> PairwiseInputs | ListwiseInputs:
    """policy_logps [B, N] lp(y); pairwise rows hold [chosen, rejected] in that order; listwise rows carry
    their lambda [B, K], which mixes the per-objective targets softmax(S_k / tau) into p_lambda [B, N].
    aligned [B, N]: the WPO aligned log-probs (pairwise losses with wpo: true)."""
    lengths = batch.response_lengths()  # [B, N]
    if listwise:
        target = mixed_target(batch.scores, batch.lambdas, target_tau, batch.response_mask)
        return ListwiseInputs(policy_logps, batch.reference_logps, lengths, target,
                              batch.response_mask, batch.dispersion)
    return PairwiseInputs(policy_logps[:, 0], policy_logps[:, 1], batch.reference_logps[:, 0],
                          batch.reference_logps[:, 1], lengths[:, 0], lengths[:, 1], batch.dispersion,
                          *((None, None) if aligned is None else (aligned[:, 0], aligned[:, 1])))


def forward_loss(model: Callable[..., torch.Tensor], batch: Batch,
                 loss_fn: Callable[[PairwiseInputs | ListwiseInputs], LossOutput], listwise: bool,
                 target_tau: float = 1.0) -> LossOutput:
    """`model` maps `PackedResponses.model_inputs()` to lp(y) [R] (the DeepSpeed engine), or to the pair
    (lp(y), a(y)) [R] each with WPO (`policy_outputs`)."""
    outputs = model(**batch.packed.model_inputs())  # [R] sum of response log-probs (and a(y))
    logps, aligned = outputs if isinstance(outputs, tuple) else (outputs, None)
    aligned = None if aligned is None else batch.grid(aligned)
    return loss_fn(loss_inputs(batch, batch.grid(logps), listwise, target_tau, aligned))  # losses [B]
