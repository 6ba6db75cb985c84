"""Pairwise preference losses (ALGORITHMS.md section 1) and the dispersion plug-in (section 2.4).

Every loss is a link applied to a logit z built from the batch:

    u      = (lp(y_w) - ref(y_w)) - (lp(y_l) - ref(y_l))
    dpo    -logsigmoid(beta * u)                                  Rafailov et al. 2023, arXiv:2305.18290
    cdpo   -(1-eps) logsigmoid(z) - eps logsigmoid(-z)            label smoothing, z = beta * u
    robust (-(1-eps) logsigmoid(z) + eps logsigmoid(-z)) / (1-2eps)  Chowdhury et al. 2024, arXiv:2403.00409
    ipo    (u_avg - 1/(2 beta))^2, u_avg from per-token MEAN log-ratios   Azar et al. 2023, arXiv:2310.12036
    simpo  -logsigmoid(beta (lp(y_w)/n(y_w) - lp(y_l)/n(y_l)) - gamma)      Meng et al. 2024, arXiv:2405.14734

With `dispersion=True` (MallowsPO plug-in, section 2.4) z is replaced by s(x) * z, where z includes SimPO's
margin gamma and is IPO's residual. Every function returns per-example losses [B]; reduction is the caller's.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from mallows_ray.losses.types import ListwiseInputs, LossOutput, PairwiseInputs

def plug_in_dispersion(z: Tensor, inputs: PairwiseInputs | ListwiseInputs, enabled: bool) -> Tensor:
    """Section 2.4: scale the logit by the per-prompt s(x) (no gradient flows into s)."""
    if not enabled:
        return z
    dispersion = getattr(inputs, "dispersion", None)
    if dispersion is None:
        raise ValueError("dispersion=True needs inputs.dispersion (the s(x) column from the data pipeline)")
    s = dispersion.detach().to(z.dtype)
    return s.reshape(s.shape + (1,) * (z.dim() - s.dim())) * z  # [B] against [B] or [B, N] logits

def log_ratios(inputs: PairwiseInputs, per_token: bool) -> tuple[Tensor, Tensor]:
    """(lp - ref) of chosen and rejected, [B] each; per-token means when `per_token`."""
    chosen = inputs.policy_chosen_logps - inputs.reference_chosen_logps
    rejected = inputs.policy_rejected_logps - inputs.reference_rejected_logps
    if per_token:
        chosen = chosen / inputs.chosen_lengths.clamp(min=1)
        rejected = rejected / inputs.rejected_lengths.clamp(min=1)
    return chosen, rejected

def pairwise_output(losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor) -> LossOutput:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    accuracy = (chosen_rewards > rejected_rewards).to(losses.dtype)
    return LossOutput(losses, chosen_rewards, rejected_rewards, accuracy)

def _check_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")

def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """-(1-eps) logsigmoid(z) - eps logsigmoid(-z); eps = 0 is plain DPO."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)

def dpo(inputs: PairwiseInputs, *, beta: float = 0.1, dispersion: bool = False) -> LossOutput:
    return cdpo(inputs, beta=beta, label_smoothing=0.0, dispersion=dispersion)

def cdpo(inputs: PairwiseInputs, *, beta: float = 0.1, label_smoothing: float = 0.0,
         dispersion: bool = False) -> LossOutput:
    _check_smoothing(label_smoothing)
    chosen, rejected = log_ratios(inputs, per_token=False)
    z = plug_in_dispersion(beta * (chosen - rejected), inputs, dispersion)
    return pairwise_output(_smoothed_logistic(z, label_smoothing), beta * chosen, beta * rejected)

def robust(inputs: PairwiseInputs, *, beta: float = 0.1, label_smoothing: float = 0.1,
           dispersion: bool = False) -> LossOutput:
    _check_smoothing(label_smoothing)
    eps = label_smoothing
    chosen, rejected = log_ratios(inputs, per_token=False)
    z = plug_in_dispersion(beta * (chosen - rejected), inputs, dispersion)
    losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return pairwise_output(losses, beta * chosen, beta * rejected)

def ipo(inputs: PairwiseInputs, *, beta: float = 0.1, dispersion: bool = False) -> LossOutput:
    chosen, rejected = log_ratios(inputs, per_token=True)
    residual = plug_in_dispersion(chosen - rejected - 1 / (2 * beta), inputs, dispersion)
    return pairwise_output(residual**2, beta * chosen, beta * rejected)

def simpo(inputs: PairwiseInputs, *, beta: float = 2.0, gamma: float = 0.5, dispersion: bool = False) -> LossOutput:
    chosen = beta * inputs.policy_chosen_logps / inputs.chosen_lengths.clamp(min=1)
    rejected = beta * inputs.policy_rejected_logps / inputs.rejected_lengths.clamp(min=1)
    z = plug_in_dispersion(chosen - rejected - gamma, inputs, dispersion)
    return pairwise_output(-F.logsigmoid(z), chosen, rejected)


__all__ = ["dpo", "cdpo", "robust", "ipo", "simpo", "plug_in_dispersion", "log_ratios", "pairwise_output"]
