"""Lambda control, measured: judge scores of replies generated under each lambda, with bootstrap intervals.

Inputs are per-prompt judge scores, `scores[lambda name][judge] = [one score per test prompt]`, the prompts
in the same order under every lambda (the demo generates every lambda's replies to the same prompts).

    interval(values)        mean and the 90% percentile-bootstrap interval of the mean over prompts
    control_matrix(scores)  {lambda: {judge: interval}}: the lambda-control matrix
    control_differences     for each objective k with a vertex row: the paired difference
                            score_k(reply under vertex k) - score_k(reply under vertex j) per prompt, for
                            every other vertex j, as an interval of its mean (paired: the bootstrap resamples
                            prompts, and both replies of a prompt go together)
    controlled(differences) k is under control when every such interval lies above 0

The bootstrap is seeded, so a report's intervals are reproducible. Pure numpy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

LEVEL = 0.9
RESAMPLES = 4000
SEED = 0

Scores = Mapping[str, Mapping[str, Sequence[float]]]


def interval(values: Sequence[float], *, level: float = LEVEL, resamples: int = RESAMPLES,
             seed: int = SEED) -> dict[str, float]:
    """{"mean", "lo", "hi"}: the mean of `values` and the `level` percentile-bootstrap interval of it."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"interval needs a non-empty 1-D sequence of values, got shape {x.shape}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)  # [resamples]
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(x.mean()), "lo": float(lo), "hi": float(hi)}


def _check(scores: Scores) -> int:
    lengths = {len(v) for per_judge in scores.values() for v in per_judge.values()}
    if len(lengths) != 1:
        raise ValueError(f"every lambda and judge needs one score per prompt; got lengths {sorted(lengths)}")
    return lengths.pop()


def control_matrix(scores: Scores) -> dict[str, dict[str, dict[str, float]]]:
    """{lambda name: {judge: interval of its mean score}}, rows and columns in the order given."""
    _check(scores)
    return {name: {judge: interval(values) for judge, values in per_judge.items()}
            for name, per_judge in scores.items()}


def control_differences(scores: Scores, objectives: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """{objective k: {other vertex j: interval of mean(score_k under k - score_k under j)}} over the objectives
    that have a row (their vertex) in `scores`; the bootstrap is paired over prompts."""
    _check(scores)
    vertices = [k for k in objectives if k in scores]
    return {k: {j: interval(np.subtract(scores[k][k], scores[j][k])) for j in vertices if j != k}
            for k in vertices}


def controlled(differences: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, bool]:
    """{objective: True when its vertex beats every other vertex on its judge with the interval above 0}."""
    return {k: bool(others) and all(d["lo"] > 0 for d in others.values()) for k, others in differences.items()}
