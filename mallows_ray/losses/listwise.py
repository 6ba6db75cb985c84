"""Listwise multi-preference lambda-weighted DPO and Plackett-Luce (ALGORITHMS.md section 3).
Sun et al. 2025, "Multi-Preference Lambda-weighted Listwise DPO", https://arxiv.org/abs/2506.19780

Per prompt: N responses, K objectives with scores S[k, i], preference weights lambda on the simplex.

    target_k      = softmax(S[k, :] / tau)
    p_lambda      = sum_k lambda_k target_k
    r_i           = beta * (lp(y_i) - ref(y_i))      (per-token means with length_normalize; x s(x) with the plug-in)
    listwise      = -sum_i p_lambda[i] log_softmax(r)[i]
    plackett_luce = -sum_i log( exp(r_(i)) / sum_{j >= i} exp(r_(j)) ),  (i) = i-th by p_lambda (stable sort)
    listwise_nll  = -sum_i p_lambda[i] lp(y_i) / n(y_i)       (the lambda-weighted SFT term; reference-free)
    lambda_contrast = -sum_i p_v[i] log softmax_v(beta lp(y_i | x, lambda_v))[v]   over the V rows v of a prompt

The policy distribution softmax(r) does not depend on k, so the lambda-weighted sum of per-objective
cross-entropies equals one cross-entropy against p_lambda: that is how it is computed.
Padding responses (response_mask False) get reward -1e9: exp() of it is exactly 0, so they drop out of every
softmax and logcumsumexp and receive zero gradient, and unlike -inf it never meets 0 * inf.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mallows_ray.losses.pairwise import per_token_mean, plug_in_dispersion
from mallows_ray.losses.types import ListwiseInputs, LossOutput

_MASKED_REWARD = -1e9


def mixed_target(scores: Tensor, lambdas: Tensor, tau: float = 1.0, response_mask: Tensor | None = None) -> Tensor:
    """p_lambda [B, N] = sum_k lambdas[:, k] softmax(scores[:, k] / tau), from scores [B, K, N] and lambdas
    [B, K] (rows on the simplex); padding responses (response_mask [B, N] False) get probability 0."""
    logits = scores / tau                                            # [B, K, N]
    if response_mask is not None:
        logits = logits.masked_fill(~response_mask[:, None, :], float("-inf"))
    return (lambdas[..., None] * torch.softmax(logits, dim=-1)).sum(dim=1)


def _valid(inputs: ListwiseInputs) -> Tensor:
    """[B, N] bool, True for real responses."""
    if inputs.response_mask is None:
        return torch.ones_like(inputs.policy_logps, dtype=torch.bool)
    return inputs.response_mask


def listwise_rewards(inputs: ListwiseInputs, beta: float, length_normalize: bool, dispersion: bool) -> Tensor:
    """r [B, N] = beta * (lp - ref) (per-token means if length_normalize), times s(x) with the plug-in;
    padding responses at -1e9."""
    ratio = inputs.policy_logps - inputs.reference_logps
    if length_normalize:
        ratio = per_token_mean(ratio, inputs.lengths)
    rewards = plug_in_dispersion(beta * ratio, inputs, dispersion)
    return rewards.masked_fill(~_valid(inputs), _MASKED_REWARD)


def pair_agreement(rewards: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """[B] share of the valid response pairs that p_lambda orders strictly (target_i > target_j) whose rewards
    are ordered the same way (r_i > r_j; a reward tie counts half). A finer held-out figure than top-1: N(N-1)/2
    pairs per prompt instead of one event. Rows without a strictly ordered pair get 0.5, the value of a
    policy that cannot tell the responses apart (e.g. one equal to the reference)."""
    ordered = (target[:, :, None] > target[:, None, :]) & valid[:, :, None] & valid[:, None, :]  # [B, N, N]
    agree = (rewards[:, :, None] > rewards[:, None, :]).to(rewards.dtype)
    agree = agree + 0.5 * (rewards[:, :, None] == rewards[:, None, :]).to(rewards.dtype)       # [B, N, N]
    pairs = ordered.sum(dim=(1, 2))
    return torch.where(pairs > 0, (agree * ordered).sum(dim=(1, 2)) / pairs.clamp(min=1), 0.5)


def _listwise_output(losses: Tensor, rewards: Tensor, inputs: ListwiseInputs) -> LossOutput:
    """Detached reward of the target's top response vs the mean of the other valid ones; top-1 and pair
    agreement."""
    valid = _valid(inputs)
    rewards = rewards.detach()
    best = inputs.target.masked_fill(~valid, -1.0).argmax(dim=-1, keepdim=True)  # [B, 1]
    others = valid.scatter(1, best, False)                                          # [B, N]
    rest = (rewards * others).sum(dim=-1) / others.sum(dim=-1).clamp(min=1)
    accuracy = (rewards.argmax(dim=-1, keepdim=True) == best)[:, 0].to(losses.dtype)
    return LossOutput(losses, rewards.gather(1, best)[:, 0], rest, accuracy,
                      pair_agreement(rewards, inputs.target, valid).to(losses.dtype))


def listwise(inputs: ListwiseInputs, *, beta: float = 0.1, length_normalize: bool = False,
             dispersion: bool = False) -> LossOutput:
    """Cross-entropy of softmax(r) against p_lambda (section 3); N = 2 with a one-hot target is DPO."""
    rewards = listwise_rewards(inputs, beta, length_normalize, dispersion)  # [B, N]
    log_probs = torch.log_softmax(rewards, dim=-1)
    losses = -(inputs.target * log_probs).masked_fill(~_valid(inputs), 0.0).sum(dim=-1)
    return _listwise_output(losses, rewards, inputs)


def plackett_luce(inputs: ListwiseInputs, *, beta: float = 0.1, length_normalize: bool = False,
                  dispersion: bool = False) -> LossOutput:
    """Negative Plackett-Luce log-likelihood of the ranking induced by p_lambda (section 3).

    Ties in p_lambda keep the data's order (stable sort); padding responses are ranked last and excluded.
    N = 2 with a one-hot target is DPO.
    """
    rewards = listwise_rewards(inputs, beta, length_normalize, dispersion)  # [B, N]
    valid = _valid(inputs)
    order = torch.sort(inputs.target.masked_fill(~valid, -1.0), dim=-1, descending=True, stable=True).indices
    ranked = rewards.gather(1, order)                                      # [B, N] r_(1), r_(2), ...
    suffix = torch.logcumsumexp(ranked.flip(-1), dim=-1).flip(-1)          # [B, N] log sum_{j >= i} exp(r_(j))
    terms = torch.where(valid.gather(1, order), ranked - suffix, 0.0)
    return _listwise_output(-terms.sum(dim=-1), rewards, inputs)


def listwise_nll(inputs: ListwiseInputs) -> LossOutput:
    """Likelihood of the replies lambda prefers: -sum_i p_lambda[i] lp(y_i) / n(y_i), per-token means.

    The listwise form of the SFT term that RPO (Pang et al. 2024, https://arxiv.org/abs/2404.19733) adds to
    DPO: with a small tau and a vertex lambda, p_lambda is (nearly) one-hot on that objective's best reply, so
    the term is the NLL of the reply lambda ranks first. A preference loss only moves the log-prob
    *differences* between the data's replies; this term also raises the likelihood of the preferred reply
    itself, under the lambda it is preferred for. Weight it beside `listwise` in `loss.terms`.
    Reference-free. Rewards: the per-token mean log-prob of each reply (accuracy: the policy's most likely
    reply per token is the target's top one).
    """
    mean_logps = per_token_mean(inputs.policy_logps, inputs.lengths)          # [B, N]
    losses = -(inputs.target * mean_logps).masked_fill(~_valid(inputs), 0.0).sum(dim=-1)
    return _listwise_output(losses, mean_logps.masked_fill(~_valid(inputs), _MASKED_REWARD), inputs)


def lambda_contrast(inputs: ListwiseInputs, *, beta: float = 1.0) -> LossOutput:
    """Which of a prompt's lambdas each reply belongs to: the listwise loss with the softmax over lambdas.

    The rows of one `group` are one prompt x with the same replies under V lambdas (`lambdas.vertex_copies`);
    row v's loss is

        -sum_i p_v[i] log softmax_v(beta lp(y_i | x, lambda_v))[v]

    the cross-entropy, for every reply i, of "which lambda is y_i's" against weights p_v[i]: the same weights
    as `listwise`, the softmax transposed. Anything in lp that does not depend on lambda (and the reference,
    which is scored without lambda) cancels inside softmax_v, so the gradient only teaches the policy to read
    lambda. If the policy gave reply i the probability c p_v[i] under every lambda_v (one c for all v) and beta
    were 1, softmax_v would be p_v[i] / sum_u p_u[i], the loss's minimiser. Chance is log V; a row alone in
    its group contributes 0 (evaluation rows, one lambda each). In the demo (SmolLM2-135M, LoRA, 34 steps,
    the 3 vertex rows of each prompt, weight 8) its logged 2-step means average 0.88 over the first 10 steps
    and 0.67 over the last 10 (chance: log 3 = 1.10), noisy (0.40-1.07); with a Dirichlet draw's row in each
    group (session 24) it stayed at chance. Its weight shows in the greedy replies: 8 instead of 3 beside
    listwise 1 + listwise_nll 20 put 3 of the 3 objectives under lambda control instead of 2 (34 and 36 steps;
    wip/README.md, session 29).
    Rewards: log softmax_v,
    the reply's share of lambda_v (accuracy: the reply this row's lambda claims most is its target's top one).
    """
    valid = _valid(inputs)
    logits = beta * inputs.policy_logps                                              # [B, N]
    group = inputs.group if inputs.group is not None else torch.arange(len(logits), device=logits.device)
    _, owner = torch.unique(group, return_inverse=True)                              # [B] in 0..G-1
    members = owner[None, :] == torch.arange(int(owner.max()) + 1, device=logits.device)[:, None]  # [G, B]
    pooled = torch.logsumexp(logits[None].masked_fill(~members[:, :, None], float("-inf")), dim=1)  # [G, N]
    shares = (logits - pooled[owner]).masked_fill(~valid, 0.0)                       # [B, N] log softmax_v
    losses = -(inputs.target * shares).sum(dim=-1)
    return _listwise_output(losses, shares.masked_fill(~valid, _MASKED_REWARD), inputs)
