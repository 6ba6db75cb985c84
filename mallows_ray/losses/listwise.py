"""Listwise multi-preference lambda-weighted DPO and Plackett-Luce (ALGORITHMS.md section 3;
Sun et al. 2025, "Multi-Preference Lambda-weighted Listwise DPO", arXiv:2506.19780).

Per prompt: N responses, K objectives with scores S[k, i], preference weights lambda on the simplex.

    target_k = softmax(S[k, :] / tau)
    p_lambda = sum_k lambda_k target_k
    r_i      = beta * (lp(y_i) - ref(y_i))          (per-token means with length_normalize; x s(x) with the plug-in)
    listwise      = -sum_i p_lambda[i] log_softmax(r)[i]
    plackett_luce = -sum_i log( exp(r_(i)) / sum_{j >= i} exp(r_(j)) ),  order = p_lambda descending (stable)

The policy distribution softmax(r) does not depend on k, so the lambda-weighted sum of per-objective
cross-entropies equals one cross-entropy against p_lambda: that is how it is computed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mallows_ray.losses.pairwise import plug_in_dispersion
from mallows_ray.losses.types import ListwiseInputs, LossOutput

# Padding responses get this reward: exp() of it is exactly 0, and unlike -inf it never meets 0 * inf.
_MASKED_REWARD = -1e9


def mixed_target(scores: Tensor, lambdas: Tensor, tau: float = 1.0, response_mask: Tensor | None = None) -> Tensor:
    """p_lambda [B, N] from scores [B, K, N] and lambdas [B, K]; padding responses get probability 0."""
    logits = scores / tau
    if response_mask is not None:
        logits = logits.masked_fill(~response_mask[:, None, :], float("-inf"))
    return (lambdas[..., None] * torch.softmax(logits, dim=-1)).sum(dim=1)


def _mask(inputs: ListwiseInputs) -> Tensor:
    if inputs.response_mask is None:
        return torch.ones_like(inputs.policy_logps, dtype=torch.bool)
    return inputs.response_mask


def listwise_rewards(inputs: ListwiseInputs, beta: float, length_normalize: bool, dispersion: bool) -> Tensor:
    """r [B, N] = beta * (lp - ref) (per-token means if length_normalize), times s(x) with the plug-in."""
    ratio = inputs.policy_logps - inputs.reference_logps
    if length_normalize:
        ratio = ratio / inputs.lengths.clamp(min=1)
    rewards = plug_in_dispersion(beta * ratio, inputs, dispersion)
    return rewards.masked_fill(~_mask(inputs), _MASKED_REWARD)


def _output(losses: Tensor, rewards: Tensor, inputs: ListwiseInputs) -> LossOutput:
    """Rewards of the target's top response vs the mean of the other valid ones; top-1 agreement."""
    mask = _mask(inputs)
    rewards = rewards.detach()
    best = inputs.target.masked_fill(~mask, -1.0).argmax(dim=-1, keepdim=True)  # [B, 1]
    top = rewards.gather(1, best)[:, 0]
    others = mask.scatter(1, best, False)
    rest = (rewards * others).sum(-1) / others.sum(-1).clamp(min=1)
    accuracy = (rewards.argmax(dim=-1, keepdim=True) == best)[:, 0].to(losses.dtype)
    return LossOutput(losses, top, rest, accuracy)


def listwise(inputs: ListwiseInputs, *, beta: float = 0.1, length_normalize: bool = False,
             dispersion: bool = False) -> LossOutput:
    rewards = listwise_rewards(inputs, beta, length_normalize, dispersion)  # [B, N]
    log_probs = torch.log_softmax(rewards, dim=-1)
    losses = -(inputs.target * log_probs).masked_fill(~_mask(inputs), 0.0).sum(dim=-1)
    return _output(losses, rewards, inputs)


def plackett_luce(inputs: ListwiseInputs, *, beta: float = 0.1, length_normalize: bool = False,
                  dispersion: bool = False) -> LossOutput:
    rewards = listwise_rewards(inputs, beta, length_normalize, dispersion)  # [B, N]
    mask = _mask(inputs)
    # ranking induced by p_lambda, padding last; stable so ties keep the data's order
    order = torch.sort(inputs.target.masked_fill(~mask, -1.0), dim=-1, descending=True, stable=True).indices
    ranked = rewards.gather(1, order)  # [B, N] r_(1) >= ... by target
    # suffix logsumexp: log sum_{j >= i} exp(r_(j)); padding contributes exp(-1e9) = 0
    suffix = torch.logcumsumexp(ranked.flip(-1), dim=-1).flip(-1)
    terms = (ranked - suffix) * mask.gather(1, order)
    return _output(-terms.sum(dim=-1), rewards, inputs)
