"""The rest of TRL 1.16's `loss_type`s (ALGORITHMS.md section 1.1) and the NLL term of RPO / Llama 3.

With cl = lp(y_w) - ref(y_w), rl = lp(y_l) - ref(y_l), d = cl - rl, z = beta * d (the f-divergence scores and
the dispersion plug-in enter through z where the column says so):

    name          per-example loss                                                  f-div  s(x)
    hinge         relu(1 - z)                                                       yes    yes
    exo_pair      q (logsigmoid(z) - log(1-eps)) + (1-q) (logsigmoid(-z) - log eps),
                  q = sigmoid(z)                                                    yes    yes
    nca_pair      -logsigmoid(beta cl) - 0.5 logsigmoid(-beta cl) - 0.5 logsigmoid(-beta rl)
    bco_pair      -logsigmoid(beta cl) - logsigmoid(-beta rl)
    sppo_hard     (cl - 1/(2 beta))^2 + (rl + 1/(2 beta))^2
    aot           cdpo_eps(beta (sort_B(lp_w - lp_l) - sort_B(ref_w - ref_l)))     batch-level
    aot_unpaired  cdpo_eps(beta (sort_B(cl) - sort_B(rl)))                         batch-level
    apo_zero      (1 - sigmoid(beta cl)) + sigmoid(beta rl)
    apo_down      sigmoid(beta cl) + (1 - sigmoid(z))
    discopop      -logsigmoid(z) (1 - sigmoid(z/tau)) + exp(-z) sigmoid(z/tau)     yes    yes
    sigmoid_norm  -logsigmoid(beta (cl/n(y_w) - rl/n(y_l)))                         yes    yes
    nll           mean: -lp(y_w)/n(y_w); sum: -lp(y_w); token: -lp(y_w) B / sum_B n(y_w)

cdpo_eps(z) = -(1-eps) logsigmoid(z) - eps logsigmoid(-z); sort_B sorts over the batch. Losses without a mark
in the s(x) column score the two replies separately (or, for aot, mix pairs of different prompts), so there is
no single preference logit for s(x) to scale: the registry refuses `dispersion` for them. Rewards are
beta * (lp - ref), as in TRL (nll: the per-token mean lp(y)). Every function returns per-example losses [B].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mallows_ray.losses.pairwise import (
    dpo_logit,
    log_ratios,
    mean_score_difference,
    pairwise_output,
    per_token_mean,
    plug_in_dispersion,
    smoothed_logistic,
)
from mallows_ray.losses.types import LossOutput, PairwiseInputs

NLL_REDUCTIONS = ("mean", "sum", "token")


def _rewards(inputs: PairwiseInputs, beta: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(cl, rl, beta cl, beta rl), [B] each."""
    chosen, rejected = log_ratios(inputs)
    return chosen, rejected, beta * chosen, beta * rejected


def hinge(inputs: PairwiseInputs, *, beta: float = 0.1, dispersion: bool = False, f_divergence: str = "reverse_kl",
          f_alpha: float = 0.5) -> LossOutput:
    """SLiC hinge: relu(1 - beta d). Zhao et al. 2023, https://arxiv.org/abs/2305.10425"""
    z, chosen, rejected = dpo_logit(inputs, beta, dispersion, f_divergence, f_alpha)
    return pairwise_output(torch.relu(1 - z), chosen, rejected)


def exo_pair(inputs: PairwiseInputs, *, beta: float = 0.1, label_smoothing: float = 1e-3, dispersion: bool = False,
             f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> LossOutput:
    """EXO-pref (Eq. 16): KL(softmax(z, 0) || (1 - eps, eps)) over {chosen, rejected}. Ji et al. 2024,
    https://arxiv.org/abs/2402.00856. eps = label_smoothing in (0, 1); the paper recommends 1e-3 (default).

        loss = q (logsigmoid(z) - log(1 - eps)) + (1 - q) (logsigmoid(-z) - log eps),   q = sigmoid(z)
    """
    z, chosen, rejected = dpo_logit(inputs, beta, dispersion, f_divergence, f_alpha)
    eps = torch.as_tensor(label_smoothing, dtype=z.dtype)
    losses = (torch.sigmoid(z) * (F.logsigmoid(z) - torch.log1p(-eps))
              + torch.sigmoid(-z) * (F.logsigmoid(-z) - torch.log(eps)))
    return pairwise_output(losses, chosen, rejected)


def nca_pair(inputs: PairwiseInputs, *, beta: float = 0.1) -> LossOutput:
    """NCA, pairwise: -logsigmoid(beta cl) - 0.5 logsigmoid(-beta cl) - 0.5 logsigmoid(-beta rl).
    Chen et al. 2024, "Noise Contrastive Alignment", https://arxiv.org/abs/2402.05369"""
    _, _, chosen, rejected = _rewards(inputs, beta)
    losses = -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
    return pairwise_output(losses, chosen, rejected)


def bco_pair(inputs: PairwiseInputs, *, beta: float = 0.1) -> LossOutput:
    """BCO, pairwise: -logsigmoid(beta cl) - logsigmoid(-beta rl) (TRL 1.16: no running-mean reward shift).
    Jung et al. 2024, "Binary Classifier Optimization", https://arxiv.org/abs/2404.04656"""
    _, _, chosen, rejected = _rewards(inputs, beta)
    return pairwise_output(-F.logsigmoid(chosen) - F.logsigmoid(-rejected), chosen, rejected)


def sppo_hard(inputs: PairwiseInputs, *, beta: float = 0.1) -> LossOutput:
    """SPPO with hard win probabilities (1 for the chosen, 0 for the rejected reply):
    (cl - 1/(2 beta))^2 + (rl + 1/(2 beta))^2. Wu et al. 2024, https://arxiv.org/abs/2405.00675"""
    cl, rl, chosen, rejected = _rewards(inputs, beta)
    return pairwise_output((cl - 0.5 / beta) ** 2 + (rl + 0.5 / beta) ** 2, chosen, rejected)


def aot(inputs: PairwiseInputs, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """AOT, paired: cdpo_eps(beta (sort_B(lp_w - lp_l) - sort_B(ref_w - ref_l))). Melnyk et al. 2024,
    "Distributional Preference Alignment of LLMs via Optimal Transport", https://arxiv.org/abs/2406.05882

    Batch-level: the sorts run over the examples of one call, i.e. one rank's micro-batch, so the loss of an
    example depends on the others in its micro-batch and changes with micro_batch_size and the number of
    ranks (TRL: the per-device batch). losses[i] is the i-th sorted quantile pair, not example i's; the
    rewards and accuracy are the per-example beta * (lp - ref).
    """
    _, _, chosen, rejected = _rewards(inputs, beta)
    policy = torch.sort(inputs.policy_chosen_logps - inputs.policy_rejected_logps, dim=0).values
    reference = torch.sort(inputs.reference_chosen_logps - inputs.reference_rejected_logps, dim=0).values
    return pairwise_output(smoothed_logistic(beta * (policy - reference), label_smoothing), chosen, rejected)


def aot_unpaired(inputs: PairwiseInputs, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """AOT, unpaired: cdpo_eps(beta (sort_B(cl) - sort_B(rl))); batch-level exactly as `aot` (see there).
    https://arxiv.org/abs/2406.05882"""
    cl, rl, chosen, rejected = _rewards(inputs, beta)
    delta = torch.sort(cl, dim=0).values - torch.sort(rl, dim=0).values
    return pairwise_output(smoothed_logistic(beta * delta, label_smoothing), chosen, rejected)


def apo_zero(inputs: PairwiseInputs, *, beta: float = 0.1) -> LossOutput:
    """APO-zero (Eq. 7), when the chosen replies beat the model's own: (1 - sigmoid(beta cl)) + sigmoid(beta rl).
    D'Oosterlinck et al. 2024, "Anchored Preference Optimization", https://arxiv.org/abs/2408.06266"""
    _, _, chosen, rejected = _rewards(inputs, beta)
    return pairwise_output(1 - torch.sigmoid(chosen) + torch.sigmoid(rejected), chosen, rejected)


def apo_down(inputs: PairwiseInputs, *, beta: float = 0.1) -> LossOutput:
    """APO-down (Eq. 8), when the chosen replies are worse than the model's own:
    sigmoid(beta cl) + (1 - sigmoid(beta (cl - rl))). https://arxiv.org/abs/2408.06266"""
    cl, rl, chosen, rejected = _rewards(inputs, beta)
    return pairwise_output(torch.sigmoid(chosen) + 1 - torch.sigmoid(beta * (cl - rl)), chosen, rejected)


def discopop(inputs: PairwiseInputs, *, beta: float = 0.1, tau: float = 0.05, dispersion: bool = False,
             f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> LossOutput:
    """DiscoPOP, log-ratio modulated (Eq. 5): with m = sigmoid(z / tau),

        loss = -logsigmoid(z) (1 - m) + exp(-z) m,   z = beta d,  tau = 0.05 as the paper recommends.

    Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms", https://arxiv.org/abs/2406.08414
    """
    z, chosen, rejected = dpo_logit(inputs, beta, dispersion, f_divergence, f_alpha)
    mix = torch.sigmoid(z / tau)
    return pairwise_output(-F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix, chosen, rejected)


def sigmoid_norm(inputs: PairwiseInputs, *, beta: float = 0.1, dispersion: bool = False,
                 f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> LossOutput:
    """DPO on per-token average log-ratios: -logsigmoid(beta (cl/n(y_w) - rl/n(y_l))) (TRL's `sigmoid_norm`;
    the length-normalised DPO of e.g. Tulu 3, https://arxiv.org/abs/2411.15124)."""
    _, _, chosen, rejected = _rewards(inputs, beta)
    z = plug_in_dispersion(beta * mean_score_difference(inputs, f_divergence, f_alpha), inputs, dispersion)
    return pairwise_output(-F.logsigmoid(z), chosen, rejected)


def nll(inputs: PairwiseInputs, *, reduction: str = "mean") -> LossOutput:
    """Negative log-likelihood of the chosen reply under the policy (the SFT term of RPO, Pang et al. 2024,
    https://arxiv.org/abs/2404.19733, and of Llama 3, https://arxiv.org/abs/2407.21783); reference-free.

        mean   -lp(y_w) / n(y_w)           per-reply token mean (RPO's length-normalised NLL)
        sum    -lp(y_w)                    summed over the reply's tokens
        token  -lp(y_w) B / sum_B n(y_w)   its batch mean is TRL's `sft`, the mean over every chosen token
                                           of the call: batch-level, like `aot` (one rank's micro-batch)

    Rewards are the per-token mean log-probs lp(y) / n(y) of each reply (accuracy: the policy's mean log-prob
    prefers the chosen reply).
    """
    if reduction not in NLL_REDUCTIONS:
        raise ValueError(f"nll reduction must be one of {', '.join(NLL_REDUCTIONS)}, got {reduction!r}")
    chosen = per_token_mean(inputs.policy_chosen_logps, inputs.chosen_lengths)
    rejected = per_token_mean(inputs.policy_rejected_logps, inputs.rejected_lengths)
    if reduction == "mean":
        losses = -chosen
    elif reduction == "sum":
        losses = -inputs.policy_chosen_logps
    else:
        tokens = inputs.chosen_lengths.sum().clamp(min=1)
        losses = -inputs.policy_chosen_logps * (inputs.policy_chosen_logps.numel() / tokens)
    return pairwise_output(losses, chosen, rejected)
