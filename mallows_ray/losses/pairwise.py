"""Pairwise preference losses (ALGORITHMS.md section 1) and the MallowsPO dispersion plug-in (section 2.4).

Each loss is a tiny link applied to a logit z (the "logit" helpers below build it once for all of them):

    u      = (lp(y_w) - ref(y_w)) - (lp(y_l) - ref(y_l))
    dpo    -logsigmoid(z),  z = beta * u                          https://arxiv.org/abs/2305.18290
    cdpo   -(1-eps) logsigmoid(z) - eps logsigmoid(-z)            conservative DPO, label smoothing eps in [0, 0.5)
    robust (-(1-eps) logsigmoid(z) + eps logsigmoid(-z)) / (1-2eps)                 https://arxiv.org/abs/2403.00409
    ipo    z^2, z = u_avg - 1/(2 beta), u_avg from per-token MEAN log-ratios         https://arxiv.org/abs/2310.12036
    simpo  -logsigmoid(z), z = beta (lp(y_w)/n(y_w) - lp(y_l)/n(y_l)) - gamma       https://arxiv.org/abs/2405.14734

(Rafailov et al. 2023; Chowdhury et al. 2024; Azar et al. 2023; Meng et al. 2024.)

With `dispersion=True` (section 2.4) z becomes s(x) * z: for IPO z is the residual, for SimPO it includes the
margin gamma. `f_divergence` (all but SimPO; scores.py) replaces each log-ratio lp - ref in u by its f-divergence
score f'(exp(lp - ref)) (TRL's `f_divergence_type`). Implicit rewards are beta * (lp(y) - ref(y)) under every
f-divergence, as in TRL (SimPO: beta * lp(y) / n(y)). Every function returns per-example losses [B];
reduction is the caller's.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from mallows_ray.losses.scores import f_score
from mallows_ray.losses.types import ListwiseInputs, LossOutput, PairwiseInputs


def require_dispersion(inputs: PairwiseInputs | ListwiseInputs) -> Tensor:
    """s(x) [B], detached (it is data, section 2.3); a clear error when the batch lacks it."""
    if inputs.dispersion is None:
        raise ValueError("this loss uses the dispersion s(x) but inputs.dispersion is None: score the data with "
                         "the reference model (ALGORITHMS 2.3) or set dispersion=False")
    return inputs.dispersion.detach()


def plug_in_dispersion(z: Tensor, inputs: PairwiseInputs | ListwiseInputs, enabled: bool) -> Tensor:
    """Section 2.4: z -> s(x) * z when enabled. z is [B] (pairwise) or [B, N] (listwise)."""
    if not enabled:
        return z
    s = require_dispersion(inputs).to(z.dtype)
    return s.reshape(s.shape + (1,) * (z.dim() - s.dim())) * z


def per_token_mean(total: Tensor, lengths: Tensor) -> Tensor:
    """total / n(y), with empty responses (n = 0) counted as length 1."""
    return total / lengths.clamp(min=1)


def log_ratios(inputs: PairwiseInputs) -> tuple[Tensor, Tensor]:
    """lp(y) - ref(y) of the chosen and of the rejected response, [B] each."""
    return (inputs.policy_chosen_logps - inputs.reference_chosen_logps,
            inputs.policy_rejected_logps - inputs.reference_rejected_logps)


def f_scores(inputs: PairwiseInputs, f_divergence: str, f_alpha: float) -> tuple[Tensor, Tensor]:
    """f-divergence scores of the chosen and of the rejected log-ratio, [B] each (the log-ratios for reverse_kl)."""
    chosen, rejected = log_ratios(inputs)
    return f_score(chosen, f_divergence, f_alpha), f_score(rejected, f_divergence, f_alpha)


def dpo_logit(inputs: PairwiseInputs, beta: float, dispersion: bool, f_divergence: str = "reverse_kl",
              f_alpha: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """(z, chosen reward, rejected reward), [B] each: z = beta * u (times s(x) with the plug-in; u from the
    f-divergence scores), rewards beta * (lp - ref). Shared by every loss of the logit beta * u."""
    chosen, rejected = log_ratios(inputs)
    score_w, score_l = f_scores(inputs, f_divergence, f_alpha)
    z = plug_in_dispersion(beta * (score_w - score_l), inputs, dispersion)
    return z, beta * chosen, beta * rejected


def pairwise_output(losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor) -> LossOutput:
    """Bundle per-example losses with detached rewards and the accuracy chosen > rejected."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    accuracy = (chosen_rewards > rejected_rewards).to(losses.dtype)
    return LossOutput(losses, chosen_rewards, rejected_rewards, accuracy)


def smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """-(1 - eps) logsigmoid(z) - eps logsigmoid(-z): the logistic loss of a label flipped with probability eps."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _check_label_smoothing(eps: float) -> None:
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {eps}")


def dpo(inputs: PairwiseInputs, *, beta: float = 0.1, dispersion: bool = False, f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5) -> LossOutput:
    """DPO (TRL's `sigmoid`): -logsigmoid(beta * u). https://arxiv.org/abs/2305.18290"""
    return cdpo(inputs, beta=beta, label_smoothing=0.0, dispersion=dispersion, f_divergence=f_divergence,
                f_alpha=f_alpha)


def cdpo(inputs: PairwiseInputs, *, beta: float = 0.1, label_smoothing: float = 0.1,
         dispersion: bool = False, f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> LossOutput:
    """Conservative DPO: the preference label is flipped with probability eps = label_smoothing
    (default 0.1, so that `cdpo` differs from `dpo` unless configured).

        loss = -(1 - eps) logsigmoid(z) - eps logsigmoid(-z),   z = beta * u
    """
    _check_label_smoothing(label_smoothing)
    z, chosen, rejected = dpo_logit(inputs, beta, dispersion, f_divergence, f_alpha)
    return pairwise_output(smoothed_logistic(z, label_smoothing), chosen, rejected)


def robust(inputs: PairwiseInputs, *, beta: float = 0.1, label_smoothing: float = 0.1,
           dispersion: bool = False, f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> LossOutput:
    """Robust DPO (unbiased under label-flip rate eps = label_smoothing). https://arxiv.org/abs/2403.00409

        loss = (-(1 - eps) logsigmoid(z) + eps logsigmoid(-z)) / (1 - 2 eps),   z = beta * u
    """
    _check_label_smoothing(label_smoothing)
    z, chosen, rejected = dpo_logit(inputs, beta, dispersion, f_divergence, f_alpha)
    losses = (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (1 - 2 * label_smoothing)
    return pairwise_output(losses, chosen, rejected)


def mean_score_difference(inputs: PairwiseInputs, f_divergence: str, f_alpha: float) -> Tensor:
    """u_avg [B] = score_w / n(y_w) - score_l / n(y_l): per-token AVERAGE scores (log-ratios for reverse_kl)."""
    score_w, score_l = f_scores(inputs, f_divergence, f_alpha)
    return per_token_mean(score_w, inputs.chosen_lengths) - per_token_mean(score_l, inputs.rejected_lengths)


def ipo(inputs: PairwiseInputs, *, beta: float = 0.1, dispersion: bool = False, f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5) -> LossOutput:
    """IPO: (u_avg - 1/(2 beta))^2 with per-token AVERAGE log-ratios (as the paper and TRL).

    The plug-in scales the residual: (s(x) * (u_avg - 1/(2 beta)))^2. https://arxiv.org/abs/2310.12036
    """
    chosen, rejected = log_ratios(inputs)
    u_avg = mean_score_difference(inputs, f_divergence, f_alpha)
    residual = plug_in_dispersion(u_avg - 1 / (2 * beta), inputs, dispersion)
    return pairwise_output(residual**2, beta * chosen, beta * rejected)


def simpo(inputs: PairwiseInputs, *, beta: float = 2.0, gamma: float = 0.5, dispersion: bool = False) -> LossOutput:
    """SimPO, reference-free (the reference_* fields are ignored). https://arxiv.org/abs/2405.14734

        loss = -logsigmoid(z),   z = beta * (lp(y_w)/n(y_w) - lp(y_l)/n(y_l)) - gamma
    Rewards are beta * lp(y) / n(y); the plug-in scales z including the margin gamma.
    """
    chosen = beta * per_token_mean(inputs.policy_chosen_logps, inputs.chosen_lengths)
    rejected = beta * per_token_mean(inputs.policy_rejected_logps, inputs.rejected_lengths)
    z = plug_in_dispersion(chosen - rejected - gamma, inputs, dispersion)
    return pairwise_output(-F.logsigmoid(z), chosen, rejected)
