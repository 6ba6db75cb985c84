"""Where a run executes: joining or starting Ray, and the compute dtype of a device. Shared by the data
pipeline's driver, the training driver and its workers, so it lives below all of them."""

from __future__ import annotations

import os

import torch


def ensure_ray(address: str | None = None) -> None:
    """Join `address` / $RAY_ADDRESS (as under `ray job submit`), else start a local instance."""
    import ray

    if not ray.is_initialized():
        # "local" explicitly: a stale ray_current_cluster file would make a bare ray.init() join a dead head
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on a GPU, fp32 on CPU (CPU bf16 matmuls are slow and lose precision)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)
