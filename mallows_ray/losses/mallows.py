"""MallowsPO (ALGORITHMS.md section 2; Chen, Zhao, Lam, Yao, Tang, ICLR 2025, arXiv:2405.14953).

Preferences follow a Mallows ranking model P(ranking | x) ∝ phi(x)^d(ranking, central), with dispersion
phi(x) in (0, 1] and s(x) = -log phi(x) >= 0 (large s: people agree on x).

MallowsPO-theta (Spearman distance, logistic link), section 2.1:
    loss = -logsigmoid(s(x) * beta * u)          (+ cDPO label smoothing when eps > 0)
i.e. DPO with a per-prompt inverse temperature; s = 1 everywhere is exactly DPO.

MallowsPO-phi (Kendall distance), section 2.2: the probability that the item ranked better by d >= 1 places
in the central ranking comes first is

    g_phi(d) = (d+1) / (1 - phi^(d+1)) - d / (1 - phi^d),       g_phi(1) = 1 / (1 + phi)

and loss = -log g_phi(beta * u), the link extended to real z by g(z) for z >= 0 and 1 - g(-z) for z < 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mallows_ray.losses.pairwise import cdpo, log_ratios, pairwise_output
from mallows_ray.losses.types import LossOutput, PairwiseInputs

PHI_MIN, PHI_MAX = 1e-6, 1.0 - 1e-6
_SERIES_BELOW = 1e-6


def mallows_theta(inputs: PairwiseInputs, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """Section 2.1: cDPO (DPO when label_smoothing = 0) with the dispersion plug-in always on."""
    return cdpo(inputs, beta=beta, label_smoothing=label_smoothing, dispersion=True)


def _log_c(x: Tensor) -> Tensor:
    """log C(x), C(x) = x / (exp(x) - 1), for x >= 0 (C(0) = 1), without overflow or 0/0.

    log C(x) = log x - x - log(-expm1(-x)) (expm1 keeps 1 - e^-x relatively exact for small x, which the
    phi -> 1 differences below need); below 1e-6 the series 1 - x/2 + x^2/12 (error ~x^4/720).
    """
    small = x < _SERIES_BELOW
    safe = torch.where(small, torch.ones_like(x), x)  # keeps the unused branch finite, so no NaN gradients
    direct = torch.log(safe) - safe - torch.log(-torch.expm1(-safe))
    return torch.where(small, torch.log1p(-x / 2 + x * x / 12), direct)


def _log_one_minus_g(z: Tensor, s: Tensor) -> Tensor:
    """log(1 - g_phi(z)) for z >= 0, phi = exp(-s).

    With B(x) = x / (1 - e^-x) = x + C(x), the link is g(z) = (B(s(z+1)) - B(sz)) / s = 1 - q(z) where
    q(z) = (C(sz) - C(s(z+1))) / s lies in (0, 1/2]. Working with q in log space avoids both the 1/s ~ 1e6
    cancellation as phi -> 1 and the underflow of 1 - g for large z. C is decreasing, so the ratio < 1.
    """
    log_ca, log_cb = _log_c(s * z), _log_c(s * (z + 1))
    return log_ca + torch.log1p(-torch.exp(log_cb - log_ca)) - torch.log(s)


def _as_s(phi_or_s: Tensor, *, is_phi: bool) -> Tensor:
    phi = phi_or_s if is_phi else torch.exp(-phi_or_s)
    return -torch.log(phi.clamp(PHI_MIN, PHI_MAX))


def _link_parts(z: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(z >= 0 mask, log(1 - g(z_+)), log(1 - g(z_-))) evaluated in float64.

    z_+ / z_- route the gradient through `where` rather than `abs`, whose gradient at exactly 0 is 0: at
    z = 0 (policy == reference, every example at step 0) the z > 0 branch is used, g(0+) = 1/(1-phi) - 1/s
    > 1/2, and the gradient is non-zero and pushes u upward (section 2.2).
    """
    z, s = z.double(), s.double()
    positive = z >= 0
    z_pos = torch.where(positive, z, torch.zeros_like(z))
    z_neg = torch.where(positive, torch.zeros_like(z), -z)
    return positive, _log_one_minus_g(z_pos, s), _log_one_minus_g(z_neg, s)


def kendall_link(z: Tensor, phi: Tensor) -> Tensor:
    """g_phi(z) extended to real z: g(z) for z >= 0, 1 - g(-z) for z < 0; phi clamped into [1e-6, 1-1e-6]."""
    z = torch.as_tensor(z)
    positive, log_q_pos, log_q_neg = _link_parts(z, _as_s(torch.as_tensor(phi, dtype=torch.float64), is_phi=True))
    g = torch.where(positive, -torch.expm1(log_q_pos), torch.exp(log_q_neg))
    return g.to(torch.promote_types(z.dtype, torch.float32))


def mallows_phi(inputs: PairwiseInputs, *, beta: float = 0.1) -> LossOutput:
    """Section 2.2: loss = -log g_phi(x)(beta * u), phi(x) = exp(-s(x)).

    Choices (the paper does not treat non-integer arguments): the link is computed in float64 (these are [B]
    tensors, so it costs nothing) and cast back; phi is clamped into [1e-6, 1 - 1e-6]; at z = 0 the z > 0
    branch is used. As phi -> 1, g -> 1/2 for every z: the loss flattens to log 2 without NaN.
    """
    if inputs.dispersion is None:
        raise ValueError("mallows_phi needs inputs.dispersion (the s(x) column from the data pipeline)")
    chosen, rejected = log_ratios(inputs, per_token=False)
    z = beta * (chosen - rejected)
    positive, log_q_pos, log_q_neg = _link_parts(z, _as_s(inputs.dispersion.detach(), is_phi=False))
    losses = torch.where(positive, -torch.log1p(-torch.exp(log_q_pos)), -log_q_neg).to(z.dtype)
    return pairwise_output(losses, beta * chosen, beta * rejected)
