"""TRL's f-divergence scores (`f_divergence_type`, f-DPO): the log-ratio x = lp(y) - ref(y) of each reply is
replaced by f'(exp(x)) before the pairwise loss forms its logit. Wang et al. 2023, "Beyond Reverse KL:
Generalizing Direct Preference Optimization with Diverse Divergence Constraints", https://arxiv.org/abs/2309.16240

    reverse_kl        x                                   (standard DPO)
    forward_kl        1 - exp(-x)                         f'(t) = 1 - 1/t
    js_divergence     log 2 + logsigmoid(x)               f'(t) = log(2t / (1 + t))
    alpha_divergence  (exp((alpha - 1) x) - 1) / (alpha - 1),   (alpha - 1) x clamped at 80 as TRL does;
                      |alpha - 1| < 1e-6 falls back to reverse_kl (the limit)

The reparameterisation leaves a beta log Z(x) term that cancels only in the chosen - rejected difference of
the scores, so only losses of that difference take this option (TRL 1.16's list: sigmoid, sigmoid_norm, hinge,
ipo, exo_pair, robust, discopop; here also cdpo and the Mallows losses, which are functions of it too).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
_ALPHA_CLAMP = 80.0  # TRL's float32 / bfloat16 bound on (alpha - 1) x, so exp() stays finite


def f_score(logratio: Tensor, f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> Tensor:
    """f'(exp(x)) of a log-ratio x [B] (table above); reverse_kl returns x itself."""
    if f_divergence == "reverse_kl" or (f_divergence == "alpha_divergence" and abs(f_alpha - 1.0) < 1e-6):
        return logratio
    if f_divergence == "forward_kl":
        return -torch.expm1(-logratio)
    if f_divergence == "js_divergence":
        return math.log(2.0) + F.logsigmoid(logratio)
    if f_divergence == "alpha_divergence":
        return torch.expm1(((f_alpha - 1.0) * logratio).clamp(max=_ALPHA_CLAMP)) / (f_alpha - 1.0)
    raise ValueError(f"unknown f_divergence {f_divergence!r}; valid: {', '.join(F_DIVERGENCES)}")
