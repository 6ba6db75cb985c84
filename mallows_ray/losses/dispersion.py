"""The practical dispersion estimator of MallowsPO (ALGORITHMS.md section 2.3).

    Hbar(y) = mean_t H_t / log(V)          per response, from the reference model (see logprobs.py)
    Hbar(x) = mean of Hbar(y) over the prompt's responses
    s(x)    = -c * log(clamp(Hbar(x), 1e-6, 1))
    c       = 1 / mean_x(-log clamp(Hbar(x)))   when `auto`, so that the mean s over the training set is 1

s(x) depends only on the reference model and the data: it is computed once, in the data pipeline.
The functions take torch tensors or anything torch.as_tensor accepts (lists, numpy arrays).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

HBAR_MIN = 1e-6


def prompt_mean_entropy(response_hbar, response_mask=None) -> Tensor:
    """Hbar(x) [B] from per-response Hbar(y) [B, N] (pairwise: N = 2), ignoring padding responses
    (response_mask [B, N], False = padding)."""
    hbar = torch.as_tensor(response_hbar)
    if response_mask is None:
        return hbar.mean(dim=-1)
    mask = torch.as_tensor(response_mask, dtype=hbar.dtype)
    return (hbar * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def _neg_log_hbar(hbar) -> Tensor:
    return -torch.log(torch.as_tensor(hbar, dtype=torch.float64).clamp(HBAR_MIN, 1.0))


def dispersion_from_entropy(hbar, c: float) -> Tensor:
    """s(x) = -c log(clamp(Hbar(x), 1e-6, 1)), float64, same shape as hbar."""
    return c * _neg_log_hbar(hbar)


def calibrate_scale(hbar) -> float:
    """c = 1 / mean(-log Hbar(x)) over a collection of prompts, so the mean s(x) is 1."""
    neg_log = _neg_log_hbar(hbar)
    if neg_log.numel() == 0:
        raise ValueError("cannot calibrate the dispersion scale c from an empty set of Hbar values")
    mean = float(neg_log.mean())
    if math.isnan(mean):
        raise ValueError("cannot calibrate the dispersion scale c: some Hbar(x) values are NaN")
    if mean <= 0.0:
        raise ValueError(
            "cannot calibrate c: every Hbar(x) is 1 (uniform next-token distributions), so -log Hbar is 0; "
            "set data.dispersion_scale to a number instead of auto"
        )
    return 1.0 / mean
