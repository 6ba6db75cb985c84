"""Typed inputs and outputs shared by every loss (ALGORITHMS.md notation: lp, ref, n, s(x))."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from torch import Tensor


@dataclass(frozen=True)
class PairwiseInputs:
    policy_chosen_logps: Tensor       # [B] lp(y_w): sum of response-token log-probs under the policy
    policy_rejected_logps: Tensor     # [B] lp(y_l)
    reference_chosen_logps: Tensor    # [B] ref(y_w) (zeros for reference-free losses)
    reference_rejected_logps: Tensor  # [B] ref(y_l)
    chosen_lengths: Tensor            # [B] n(y_w), response token counts
    rejected_lengths: Tensor          # [B] n(y_l)
    dispersion: Tensor | None = None  # [B] s(x) >= 0, no grad; needed by the Mallows losses / plug-in
    policy_chosen_aligned: Tensor | None = None    # [B] WPO's a(y_w) = mean_t log p(y_t) - log sum_v p_v^2, no grad
    policy_rejected_aligned: Tensor | None = None  # [B] a(y_l); both only for losses with wpo: true
    # LD-DPO (`ld_alpha`, length.py): the sums over the first l = min(n(y_w), n(y_l)) tokens of each reply
    policy_chosen_shared_logps: Tensor | None = None     # [B] lp_l(y_w), differentiable
    policy_rejected_shared_logps: Tensor | None = None   # [B] lp_l(y_l)
    reference_chosen_shared_logps: Tensor | None = None  # [B] ref_l(y_w), from the scored data
    reference_rejected_shared_logps: Tensor | None = None  # [B] ref_l(y_l)


@dataclass(frozen=True)
class ListwiseInputs:
    policy_logps: Tensor                 # [B, N] lp(y_i)
    reference_logps: Tensor              # [B, N] ref(y_i)
    lengths: Tensor                      # [B, N] n(y_i)
    target: Tensor                       # [B, N] p_lambda, sums to 1 over the valid responses of a row
    response_mask: Tensor | None = None  # [B, N] bool, False marks padding (prompts with fewer responses)
    dispersion: Tensor | None = None     # [B] s(x)
    group: Tensor | None = None          # [B] long: rows with equal values are one prompt and its responses under
                                         # different lambdas (`lambdas.vertex_copies`); None: every row its own


@dataclass(frozen=True)
class LossOutput:
    losses: Tensor            # [B] per-example loss (carries the graph); reduction happens outside
    chosen_rewards: Tensor    # [B] detached implicit reward of the chosen (listwise: the target's top) response
    rejected_rewards: Tensor  # [B] detached reward of the rejected (listwise: mean of the other valid) responses
    accuracy: Tensor          # [B] detached 0/1 (pairwise: chosen reward > rejected; listwise: top-1 agreement)
    pair_accuracy: Tensor | None = None  # [B] listwise only: share of target-ordered response pairs the rewards
                                         # order the same way (`listwise.pair_agreement`)
    terms: dict[str, Tensor] | None = None  # composite losses: {term label: [B] detached unweighted term loss}


@dataclass(frozen=True)
class Loss:
    """A loss with its parameters bound, and what the code around it must know of it. Built by
    `registry.build_loss` (one loss) or `composite.build_composite` (a weighted sum); training and evaluation
    ask these fields, never the loss's name.

        out = loss(inputs)   # LossOutput; inputs are PairwiseInputs or ListwiseInputs as `kind` says
    """

    name: str                                # the loss's name; a composite's term labels joined by "+"
    fn: Callable[..., LossOutput]            # inputs -> LossOutput
    params: dict[str, Any]                   # as built: {beta: 0.1, ...}; a composite: {label: {weight, params}}
    kind: Literal["pairwise", "listwise"]
    needs_reference: bool                    # reads ref(y) (False: SimPO, nll, ...: the reference may be zeros)
    reads_dispersion: bool                   # reads s(x) (the Mallows losses; others with dispersion: true)
    wpo: bool                                # needs WPO's aligned log-probs a(y) from the policy forward
    ld: bool                                 # needs LD-DPO's shared-length sums lp_l(y) (ld_alpha < 1)
    across_lambdas: bool                     # compares a prompt's rows under different lambdas (lambda_contrast)

    def __call__(self, inputs: PairwiseInputs | ListwiseInputs) -> LossOutput:
        return self.fn(inputs)

    @property
    def listwise(self) -> bool:
        return self.kind == "listwise"
