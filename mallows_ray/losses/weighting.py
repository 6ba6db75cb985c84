"""WPO weighting (`wpo: true` on a pairwise loss; TRL's `use_weighting`). Zhou et al. 2024, "WPO: Enhancing
RLHF with Weighted Preference Optimization", https://arxiv.org/abs/2406.11827, Eq. 2 with TRL 1.16's alignment:

    a(y)   = mean_t (log p(y_t) - log sum_v p_v^2)      (policy, no gradient; logprobs.py, with_wpo)
    loss  -> loss * exp(a(y_w)) * exp(a(y_l))

so pairs the current policy would itself sample weigh more, off-policy ones less. The weights carry no gradient.
Not for the sorting losses (aot, aot_unpaired), whose i-th loss belongs to no single pair (TRL refuses too).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from mallows_ray.losses.types import LossOutput, PairwiseInputs


def wpo_weights(inputs: PairwiseInputs) -> torch.Tensor:
    """exp(a(y_w) + a(y_l)) [B], detached; a clear error when the forward did not compute a(y)."""
    if inputs.policy_chosen_aligned is None or inputs.policy_rejected_aligned is None:
        raise ValueError("wpo: true needs the policy's aligned log-probs a(y) (PairwiseInputs.policy_*_aligned), "
                         "which the training step computes when the loss config asks for wpo")
    return torch.exp(inputs.policy_chosen_aligned + inputs.policy_rejected_aligned).detach()


def wpo_weighted(inputs: PairwiseInputs, *, loss: Callable[[PairwiseInputs], LossOutput]) -> LossOutput:
    """`loss` with each example's loss multiplied by its WPO weight (rewards and accuracy unchanged)."""
    out = loss(inputs)
    return dataclasses.replace(out, losses=out.losses * wpo_weights(inputs).to(out.losses.dtype))
