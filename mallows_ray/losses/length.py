"""LD-DPO's length desensitisation (`ld_alpha` on a pairwise loss; TRL 1.16's `ld_alpha`). Liu et al. 2024,
"Length Desensitization in Preference Optimization", https://arxiv.org/abs/2409.06411, as TRL 1.16 computes it:

    l        = min(n(y_w), n(y_l))                               the shorter reply's token count
    lp_l(y)  = sum_{t < l} log p(y_t)                            the part both replies share in length
    lp(y)   -> lp_l(y) + ld_alpha * (lp(y) - lp_l(y))            the verbose tail weighs ld_alpha in [0, 1]

for the policy and the reference (ref_l(y) from the scored data), before the loss forms its log-ratios; the
shorter reply is unchanged. ld_alpha = 1 is the plain loss (the registry then skips the wrapper). Lengths n(y)
stay the full token counts (TRL: sigmoid_norm and ipo divide by the whole completion's length). Not for nll
(TRL's sft term reads the unweighted token log-probs) nor for the listwise losses (l is defined for a pair).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from torch import Tensor

from mallows_ray.losses.types import LossOutput, PairwiseInputs


def desensitised(full: Tensor, shared: Tensor | None, ld_alpha: float, what: str) -> Tensor:
    """shared + ld_alpha * (full - shared), [B]; a clear error when the shared-part sum is missing."""
    if shared is None:
        raise ValueError(f"ld_alpha needs the {what} log-prob sums over the shared length l = min(n(y_w), n(y_l)) "
                         f"(PairwiseInputs.*_shared_logps): the training step computes the policy's when the loss "
                         f"config sets ld_alpha, and prepare scores the reference's (column ref_shared_logps)")
    return shared + ld_alpha * (full - shared)


def ld_weighted(inputs: PairwiseInputs, *, loss: Callable[[PairwiseInputs], LossOutput], ld_alpha: float,
                reference: bool = True) -> LossOutput:
    """`loss` on LD-weighted log-prob sums; `reference=False` (reference-free losses) leaves ref(y) alone."""
    replaced = {
        "policy_chosen_logps": desensitised(inputs.policy_chosen_logps, inputs.policy_chosen_shared_logps,
                                            ld_alpha, "policy"),
        "policy_rejected_logps": desensitised(inputs.policy_rejected_logps, inputs.policy_rejected_shared_logps,
                                              ld_alpha, "policy"),
    }
    if reference:
        replaced["reference_chosen_logps"] = desensitised(
            inputs.reference_chosen_logps, inputs.reference_chosen_shared_logps, ld_alpha, "reference")
        replaced["reference_rejected_logps"] = desensitised(
            inputs.reference_rejected_logps, inputs.reference_rejected_shared_logps, ld_alpha, "reference")
    return loss(dataclasses.replace(inputs, **replaced))
