"""From a micro-batch to the loss: one policy forward, then the loss's inputs (pairwise or listwise).

Training and evaluation both call `forward_loss`; pairwise and listwise losses share the packing and the
forward and differ only in how the [B, N] per-response values are handed to the loss.
"""

from __future__ import annotations

from typing import Callable

import torch

from mallows_ray.losses import ListwiseInputs, Loss, LossOutput, PairwiseInputs, ResponseStats, mixed_target
from mallows_ray.train.batches import Batch


def policy_outputs(stats: ResponseStats, with_wpo: bool) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """What the policy forward returns: lp(y) [R]; with WPO or LD-DPO's prefix sums, the triple (lp(y),
    aligned mean log-prob a(y) or None, shared-length sum lp_l(y) or None), [R] each."""
    if not with_wpo and stats.prefix_logp_sum is None:
        return stats.logp_sum
    return stats.logp_sum, stats.aligned_logp_mean if with_wpo else None, stats.prefix_logp_sum


def loss_inputs(batch: Batch, policy_logps: torch.Tensor, listwise: bool, target_tau: float = 1.0,
                aligned: torch.Tensor | None = None,
                shared: torch.Tensor | None = None) -> PairwiseInputs | ListwiseInputs:
    """policy_logps [B, N] lp(y); pairwise rows hold [chosen, rejected] in that order; listwise rows carry
    their lambda [B, K], which mixes the per-objective targets softmax(S_k / tau) into p_lambda [B, N].
    aligned [B, N]: the WPO aligned log-probs (pairwise losses with wpo: true); shared [B, N]: the policy's
    shared-length sums lp_l(y) (ld_alpha), which go with the batch's reference ref_l(y)."""
    lengths = batch.response_lengths()  # [B, N]
    if listwise:
        target = mixed_target(batch.scores, batch.lambdas, target_tau, batch.response_mask)
        return ListwiseInputs(policy_logps, batch.reference_logps, lengths, target,
                              batch.response_mask, batch.dispersion, batch.groups)
    ref_shared = batch.reference_shared_logps
    return PairwiseInputs(policy_logps[:, 0], policy_logps[:, 1], batch.reference_logps[:, 0],
                          batch.reference_logps[:, 1], lengths[:, 0], lengths[:, 1], batch.dispersion,
                          *_columns(aligned), *_columns(shared), *_columns(ref_shared))


def _columns(values: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """[B, 2] -> (chosen [B], rejected [B]); None -> (None, None)."""
    return (None, None) if values is None else (values[:, 0], values[:, 1])


def forward_loss(model: Callable[..., torch.Tensor], batch: Batch, loss: Loss, target_tau: float = 1.0) -> LossOutput:
    """`model` maps `PackedResponses.model_inputs()` to lp(y) [R] (the DeepSpeed engine), or to the pair
    (lp(y), a(y)) with WPO, or to `policy_outputs`'s triple, [R] each. A loss with ld_alpha (`loss.ld`) also
    hands the model the shared lengths l, so it returns lp_l(y)."""
    outputs = model(**batch.packed.model_inputs(with_prefix=loss.ld))  # [R] sum of response log-probs (and more)
    logps, aligned, shared = (*outputs, None)[:3] if isinstance(outputs, tuple) else (outputs, None, None)
    aligned, shared = (None if v is None else batch.grid(v) for v in (aligned, shared))
    return loss(loss_inputs(batch, batch.grid(logps), loss.listwise, target_tau, aligned, shared))  # losses [B]
