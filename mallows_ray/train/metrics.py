"""Metrics reduced across ranks as sums and counts, never as a mean of per-rank means.

Ranks can hold different numbers of examples (the last batch, length grouping), so each rank accumulates
sums; one all-reduce of a float64 vector turns them into global sums; division happens once, after.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from mallows_ray.losses import LossOutput


class MetricSums:
    """Per-example sums of every metric since the last `reduce()`, plus the example and token counts."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)

    def add_loss_output(self, out: LossOutput, dispersion: torch.Tensor | None) -> None:
        margin = out.chosen_rewards - out.rejected_rewards
        self.sums["examples"] += out.losses.numel()
        self.sums["loss"] += out.losses.detach().sum().item()
        self.sums["rewards/chosen"] += out.chosen_rewards.sum().item()
        self.sums["rewards/rejected"] += out.rejected_rewards.sum().item()
        self.sums["rewards/margin"] += margin.sum().item()
        self.sums["rewards/accuracy"] += out.accuracy.sum().item()
        if dispersion is not None:
            self.sums["dispersion/mean"] += dispersion.sum().item()

    def add(self, name: str, value: float) -> None:
        """A raw count that is summed, not averaged (tokens, samples)."""
        self.sums[name] += value

    def reduce(self, counts: tuple[str, ...] = ("tokens",)) -> dict[str, float]:
        """Global means of the per-example metrics and global totals of `counts`; resets the sums."""
        names = sorted(self.sums)
        vector = torch.tensor([self.sums[n] for n in names], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            # every rank must call with the same names: the loss output fixes them, so they agree
            dist.all_reduce(vector, op=dist.ReduceOp.SUM)
        totals = dict(zip(names, vector.tolist()))
        examples = max(totals.get("examples", 0.0), 1.0)
        self.sums = defaultdict(float)
        return {n: (v if n in counts or n == "examples" else v / examples) for n, v in totals.items()}
