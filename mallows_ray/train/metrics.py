"""What a run records: metrics reduced across ranks as sums and counts, the progress line, the example log.

Ranks can hold different numbers of examples (an evaluation tail, padded ranks), so each rank accumulates
sums; one all-reduce of a float64 vector turns them into global sums; division happens once, after — never
a mean of per-rank means.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import torch
import torch.distributed as dist

from mallows_ray.losses import LossOutput

# Summed, not averaged, by `MetricSums.reduce`.
COUNTS = ("examples", "tokens", "micro_batches")


def _all_reduce(vector: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """`vector` (a CPU tensor) reduced over the ranks, on the CPU; itself outside a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return vector
    if dist.get_backend() == "nccl":  # NCCL reduces GPU tensors only
        on_gpu = vector.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=op)
        return on_gpu.cpu()
    dist.all_reduce(vector, op=op)
    return vector


class MetricSums:
    """Per-example sums of every metric since the last `reduce()`, plus the example and token counts."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)

    def add_loss_output(self, out: LossOutput, dispersion: torch.Tensor, count: int | None = None) -> None:
        """Adds the first `count` examples of a micro-batch (all by default; see `batches.eval_slice`)."""
        keep = slice(0, out.losses.numel() if count is None else count)
        self.sums["examples"] += keep.stop
        self.sums["loss"] += out.losses.detach()[keep].sum().item()
        self.sums["rewards/chosen"] += out.chosen_rewards[keep].sum().item()
        self.sums["rewards/rejected"] += out.rejected_rewards[keep].sum().item()
        self.sums["rewards/margin"] += (out.chosen_rewards - out.rejected_rewards)[keep].sum().item()
        self.sums["rewards/accuracy"] += out.accuracy[keep].sum().item()
        if out.pair_accuracy is not None:  # listwise losses: the same on every rank, so reduce stays collective
            self.sums["rewards/pair_accuracy"] += out.pair_accuracy[keep].sum().item()
        self.sums["dispersion/mean"] += dispersion[keep].sum().item()  # mean s(x) of the examples seen
        for label, losses in (out.terms or {}).items():  # composite losses: each term's unweighted loss
            self.sums[f"loss/{label}"] += losses[keep].sum().item()

    def add(self, name: str, value: float) -> None:
        """A raw count that is summed, not averaged (one of COUNTS)."""
        self.sums[name] += value

    def reduce(self) -> dict[str, float]:
        """Global means of the per-example metrics and global totals of COUNTS; resets the sums.

        Collective: every rank calls it with the same names (the loss output fixes them).
        """
        names = sorted(self.sums)
        vector = _all_reduce(torch.tensor([self.sums[n] for n in names], dtype=torch.float64))
        totals = dict(zip(names, vector.tolist()))
        examples = max(totals.get("examples", 0.0), 1.0)
        self.sums = defaultdict(float)
        return {n: (v if n in COUNTS else v / examples) for n, v in totals.items()}


def rank_extremes(value: float) -> tuple[float, float]:
    """(min, max) of a per-rank value over all ranks (collective), so rank 0's report covers every rank."""
    vector = torch.tensor([-value, value], dtype=torch.float64)
    low, high = _all_reduce(vector, dist.ReduceOp.MAX).tolist()
    return -low, high


def progress_line(metrics: dict[str, float], total_steps: int, eta_s: float | None = None) -> str:
    """One concise line per log step (rank 0); `eta_s`: seconds left at this attempt's pace so far."""
    eta = [] if eta_s is None else [f"ETA {int(eta_s) // 60}:{int(eta_s) % 60:02d}"]
    parts = [f"step {int(metrics['step'])}/{total_steps}", *eta, f"loss {metrics['loss']:.4f}",
             f"acc {metrics['rewards/accuracy']:.3f}", f"margin {metrics['rewards/margin']:+.4f}",
             f"lr {metrics['lr']:.2e}", f"gnorm {metrics['grad_norm']:.3f}", f"{metrics['tokens_per_s']:.0f} tok/s",
             f"{metrics['samples_per_s']:.2f} samples/s"]
    terms = [f"{name[5:]} {value:.4f}" for name, value in sorted(metrics.items()) if name.startswith("loss/")]
    if terms:
        parts.insert(2, "terms " + ", ".join(terms))
    if "eval/loss" in metrics:
        parts.append(f"eval loss {metrics['eval/loss']:.4f} acc {metrics['eval/rewards/accuracy']:.3f}")
    return "[train] " + " | ".join(parts)


class ExampleLog:
    """Per-rank jsonl of the example ids each optimizer step consumed: `{"step": s, "ids": [...]}`.

    Appended, never rewritten: after a restart the redone steps appear again (the last line of a step is the
    one that counts), which is what lets a test check that nothing was repeated or skipped. Written only
    when the run folder is on a local or mounted filesystem (`enabled`).
    """

    def __init__(self, run_dir: str, rank: int, enabled: bool):
        self.path = os.path.join(run_dir, "examples", f"rank{rank}.jsonl") if enabled else None
        if self.path:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)

    def write(self, step: int, ids: list[str]) -> None:
        if self.path:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"step": step, "ids": ids}) + "\n")
