"""MallowsPO (ALGORITHMS.md section 2). Chen, Zhao, Lam, Yao, Tang, ICLR 2025, https://arxiv.org/abs/2405.14953

Preferences follow a Mallows ranking model P(ranking | x) ∝ phi(x)^d(ranking, central ranking), with
dispersion phi(x) in (0, 1]; the losses take s(x) = -log phi(x) >= 0 (large s: people agree on x).

MallowsPO-theta (Spearman distance, logistic link), section 2.1:

    loss = -logsigmoid(s(x) * beta * u)          (+ cDPO label smoothing when eps > 0)

i.e. DPO with a per-prompt inverse temperature; s = 1 everywhere is exactly DPO.

MallowsPO-phi (Kendall distance), section 2.2: the item whose central rank is better by d >= 1 comes first
with probability

    g_phi(d) = (d+1) / (1 - phi^(d+1)) - d / (1 - phi^d),        g_phi(1) = 1 / (1 + phi)

and loss = -log g_phi(beta * u), the link extended to real z by g(z) for z >= 0 and 1 - g(-z) for z < 0.

The authors' own conventions (haoxian-chen/MallowsPO; ALGORITHMS.md section 2.2b), under their own names so
their runs can be reproduced, beside the project's `simpo` / `ipo` with `dispersion: true`:

    mallows_simpo  -logsigmoid(s(x) (beta (lp(y_w)/n(y_w) - lp(y_l)/n(y_l)) - gamma)),  gamma = beta * home_advantage
    mallows_ipo    (s(x) u_avg - 1/(2 beta))^2      (the project's plug-in: (s(x) (u_avg - 1/(2 beta)))^2)
"""

from __future__ import annotations

import torch
from torch import Tensor

from mallows_ray.losses.pairwise import (
    cdpo,
    dpo_logit,
    log_ratios,
    mean_score_difference,
    pairwise_output,
    require_dispersion,
    simpo,
)
from mallows_ray.losses.types import LossOutput, PairwiseInputs

PHI_MIN, PHI_MAX = 1e-6, 1.0 - 1e-6
_SERIES_BELOW = 1e-2  # log C(x) switches to its Taylor series below this x


def mallows_theta(inputs: PairwiseInputs, *, beta: float = 0.1, label_smoothing: float = 0.0,
                  f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> LossOutput:
    """Section 2.1: cDPO (DPO when label_smoothing = 0) with the dispersion plug-in always on."""
    return cdpo(inputs, beta=beta, label_smoothing=label_smoothing, dispersion=True, f_divergence=f_divergence,
                f_alpha=f_alpha)


def mallows_simpo(inputs: PairwiseInputs, *, beta: float = 10.0, home_advantage: float = 0.25) -> LossOutput:
    """The authors' Mallows-SimPO (section 2.2b): `simpo` with the plug-in on and the margin given as the
    ratio home_advantage = gamma / beta, as their configs write it. Defaults: their beta = 10; home_advantage
    0.25 is our choice, the gamma / beta of `simpo`'s defaults (0.5 / 2): set it from the run you reproduce.
    Reference-free."""
    return simpo(inputs, beta=beta, gamma=beta * home_advantage, dispersion=True)


def mallows_ipo(inputs: PairwiseInputs, *, beta: float = 0.1) -> LossOutput:
    """The authors' Mallows-IPO (section 2.2b): (s(x) u_avg - 1/(2 beta))^2, u_avg from per-token mean
    log-ratios as in `ipo`. The dispersion scales u only; `ipo` with dispersion=True scales the residual."""
    chosen, rejected = log_ratios(inputs)
    s = require_dispersion(inputs).to(chosen.dtype)
    residual = s * mean_score_difference(inputs, "reverse_kl", 0.5) - 1 / (2 * beta)
    return pairwise_output(residual**2, beta * chosen, beta * rejected)


def _log_c(x: Tensor) -> Tensor:
    """log C(x) for x >= 0, where C(x) = x / (e^x - 1), C(0) = 1 (C is decreasing, from 1 to 0).

    Direct form log x - x - log(-expm1(-x)) (no overflow for large x; expm1 keeps 1 - e^-x exact for small
    x); below 1e-2 the Taylor series C(x) = 1 - x/2 + x^2/12 - x^4/720 + O(x^6) through log1p, which is
    exact at x = 0 and accurate to ~1e-15 at the switch, where the direct form would lose digits to
    cancellation of log x against log(1 - e^-x).
    """
    small = x < _SERIES_BELOW
    safe = torch.where(small, torch.ones_like(x), x)  # the unused branch stays finite: no NaN gradients
    direct = torch.log(safe) - safe - torch.log(-torch.expm1(-safe))
    x2 = x * x
    return torch.where(small, torch.log1p(-x / 2 + x2 / 12 - x2 * x2 / 720), direct)


def _log_kendall_link(z: Tensor, s: Tensor) -> Tensor:
    """log g(z) of the extended link, in float64, for z of any sign and s = -log phi > 0 (broadcast).

    With B(x) = x / (1 - e^-x) = x + C(x) the link is g(d) = (B(s(d+1)) - B(sd)) / s = 1 - q(d), where

        q(d) = (C(sd) - C(s(d+1))) / s   in (0, 1/2)

    is computed in log space: log q = log C(sd) + log1p(-C(s(d+1)) / C(sd)) - log s. This avoids the
    1/s ~ 1e6 cancellation of the textbook formula as phi -> 1 and the underflow of 1 - g for large |z|
    (so -log g stays finite and exact for very negative z). Then log g(z) = log1p(-q(z)) for z >= 0 and
    log q(-z) for z < 0. z = 0 takes the z > 0 branch, g(0+) = 1/(1 - phi) - 1/s > 1/2: the extension jumps
    at 0, and the one-sided limit gives policy == reference (step 0) a finite, non-zero gradient that
    raises u. |z| is formed as where(z >= 0, z, -z), whose derivative at 0 is +1 (abs() would give 0).
    """
    z, s = z.double(), s.double()
    positive = z >= 0
    d = torch.where(positive, z, -z)  # |z| >= 0: both branches below get a safe argument
    log_c_d = _log_c(s * d)
    # log(1 - C(s(d+1)) / C(sd)) as log(-expm1(.)): the ratio is 1 - O(s), and 1 - exp(x) would cancel
    log_q = log_c_d + torch.log(-torch.expm1(_log_c(s * (d + 1)) - log_c_d)) - torch.log(s)
    return torch.where(positive, torch.log1p(-torch.exp(log_q)), log_q)


def _neg_log_phi(phi: Tensor) -> Tensor:
    """s = -log phi with phi clamped into [1e-6, 1 - 1e-6] (so s in [1e-6, 13.8]); phi is float64."""
    return -torch.log(phi.clamp(PHI_MIN, PHI_MAX))


def kendall_link(z: Tensor | float, phi: Tensor | float) -> Tensor:
    """g_phi(z) extended to real z: g(z) for z >= 0, 1 - g(-z) for z < 0 (section 2.2); broadcasts z and phi.

    phi is clamped into [1e-6, 1 - 1e-6]; the result has z's floating dtype (at least float32).
    """
    z = torch.as_tensor(z)
    g = torch.exp(_log_kendall_link(z, _neg_log_phi(torch.as_tensor(phi, dtype=torch.float64))))
    return g.to(torch.promote_types(z.dtype, torch.float32))


def mallows_phi(inputs: PairwiseInputs, *, beta: float = 0.1, f_divergence: str = "reverse_kl",
                f_alpha: float = 0.5) -> LossOutput:
    """Section 2.2: loss = -log g_phi(x)(beta * u), phi(x) = exp(-s(x)), s(x) = inputs.dispersion.

    Our choices, since the paper's treatment of non-integer arguments was not available (see
    `_log_kendall_link` for the algebra):
    - the link is evaluated in float64 ([B] tensors, so it costs nothing) and cast back to the logps' dtype;
      in float32 the textbook formula with s ~ 1e-6 cancels catastrophically (1/s ~ 1e6);
    - phi is clamped into [1e-6, 1 - 1e-6]; as phi -> 1, g -> 1/2 for every z and the loss flattens to
      log 2 with small, finite gradients, no NaN;
    - z = 0 uses the z > 0 branch limit g(0+) = 1/(1 - phi) - 1/s, so training from policy == reference
      moves u upward;
    - log C(x) = log(x / (e^x - 1)) switches to its Taylor series near x = 0 (value and gradient finite);
    - both torch.where branches always see safe arguments, so no NaN gradient leaks from the unused one.
    """
    s = _neg_log_phi(torch.exp(-require_dispersion(inputs).double()))
    z, chosen, rejected = dpo_logit(inputs, beta, False, f_divergence, f_alpha)
    losses = -_log_kendall_link(z, s).to(z.dtype)
    return pairwise_output(losses, chosen, rejected)
