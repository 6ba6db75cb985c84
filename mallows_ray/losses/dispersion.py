"""The practical dispersion estimator of MallowsPO (ALGORITHMS.md section 2.3).

    Hbar(y) = mean_t H_t / log(V)          per response, from the reference model (see logprobs.py)
    Hbar(x) = mean of Hbar(y) over the prompt's responses
    s(x)    = -c * log(clamp(Hbar(x), 1e-6, 1))
    c       = 1 / mean_x(-log clamp(Hbar(x)))   when `auto`, so that the mean s over the training set is 1

s(x) depends only on the reference model and the data: prepare stores Hbar(x) and c, and s(x) is computed
where rows are read (data/scored_split.py).
The functions take torch tensors or anything torch.as_tensor accepts (lists, numpy arrays).
"""

from __future__ import annotations

import math

import numpy as np
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


class EntropyAggregate:
    """c = 1 / mean(-log Hbar(x)) over a collection of prompts, so the mean s(x) is 1 (ALGORITHMS 2.3), from
    data seen a block at a time (prepare never holds a split's Hbar(x)): the exact count and sums of Hbar(x)
    and of -log Hbar(x), so c is exact, and a histogram of log(-log Hbar(x)) in
    `BINS` equal bins over [log LOW, log(-log HBAR_MIN)] for percentiles, to within half a bin: 0.19% of
    -log Hbar, so of s(x) (values below LOW, Hbar within 1e-12 of 1, fall in the first bin)."""

    BINS = 8192
    LOW = 1e-12
    _SPAN = (math.log(LOW), math.log(-math.log(HBAR_MIN)))

    def __init__(self):
        self.count, self.nan = 0, 0
        self.hbar_sum = self.neg_log_sum = 0.0
        self.histogram = np.zeros(self.BINS, dtype=np.int64)

    def add(self, hbar) -> None:
        hbar = np.array(hbar, dtype=np.float64).reshape(-1)  # a copy: Arrow's zero-copy arrays are read-only
        neg_log = _neg_log_hbar(hbar).numpy()
        finite = ~np.isnan(neg_log)
        self.nan += int((~finite).sum())
        self.count += int(finite.sum())
        self.hbar_sum += float(hbar[finite].sum())
        self.neg_log_sum += float(neg_log[finite].sum())
        low, high = self._SPAN
        where = (np.log(np.maximum(neg_log[finite], self.LOW)) - low) / (high - low) * self.BINS
        self.histogram += np.bincount(np.clip(where.astype(np.int64), 0, self.BINS - 1), minlength=self.BINS)

    def scale(self) -> float:
        """c = 1 / mean(-log Hbar(x)); ValueError when it is undefined (no values, NaN, every Hbar 1)."""
        if self.count + self.nan == 0:
            raise ValueError("cannot calibrate the dispersion scale c from an empty set of Hbar values")
        if self.nan:
            raise ValueError("cannot calibrate the dispersion scale c: some Hbar(x) values are NaN")
        if self.neg_log_sum <= 0.0:
            raise ValueError(
                "cannot calibrate c: every Hbar(x) is 1 (uniform next-token distributions), so -log Hbar is 0; "
                "set data.dispersion_scale to a number instead of auto"
            )
        return self.count / self.neg_log_sum

    def neg_log_percentiles(self, qs) -> np.ndarray:
        """Percentiles `qs` (0-100) of -log Hbar(x): the middle of the bin where the cumulative count reaches
        q% of the values."""
        cumulative = np.cumsum(self.histogram)
        bins = np.searchsorted(cumulative, np.asarray(qs, dtype=np.float64) / 100 * self.count, side="left")
        low, high = self._SPAN
        return np.exp(low + (np.minimum(bins, self.BINS - 1) + 0.5) * (high - low) / self.BINS)
