"""Checkpoints through Ray Train: DeepSpeed's per-rank files, RNG states and the data position.

Saving: every rank writes its own shards into a private temp folder (`engine.save_checkpoint`, no gather to
one rank) plus its RNG states, and reports the folder with the same `checkpoint_dir_name`; Ray copies all
ranks' files into one `<run_dir>/ckpt_stepNNNNNN/` folder (DeepSpeed's file names carry the rank, so they
never collide). The LR scheduler is saved by the engine, which owns it. The data position is the number of
optimizer steps taken: with the deterministic global-batch order of `batches.py` that pins down the epoch
and the batch within it (`TrainPlan.position`).

Restoring: `ray.train.get_checkpoint()` is the latest committed checkpoint, both after a worker failure
(`FailureConfig` restart) and when a new driver runs the same `run.name` and `run.storage_path` again.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile

import numpy as np
import ray.train
import torch

from mallows_ray.train.plan import TrainPlan

log = logging.getLogger(__name__)

LATEST = "latest"  # DeepSpeed's file naming the last tag in a checkpoint folder


def _rng_file(folder: str, rank: int) -> str:
    return os.path.join(folder, f"rng_rank{rank}.pt")


def report(metrics: dict, engine, plan: TrainPlan, step: int, *, save: bool, state: dict | None = None) -> None:
    """`ray.train.report(metrics)` from every rank, with a checkpoint of the state after `step` when `save`;
    `state` is extra JSON-able training state (the lambda scheduler's) that `restore` hands back.

    All ranks must call this the same number of times: the report is a barrier, and saving is collective.
    """
    if not save:
        ray.train.report(metrics)
        return
    rank = ray.train.get_context().get_world_rank()
    folder = tempfile.mkdtemp(prefix=f"mallows_ckpt_r{rank}_")  # per rank: the save would clash in a shared one
    client_state = {"step": step, "world_size": ray.train.get_context().get_world_size(),
                    "global_batch_size": plan.global_batch_size, "steps_per_epoch": plan.steps_per_epoch,
                    "state": state or {}}
    engine.save_checkpoint(folder, tag=f"step{step}", client_state=client_state)
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, _rng_file(folder, rank))
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                     checkpoint_dir_name=f"ckpt_step{step:06d}", delete_local_checkpoint_after_upload=True)


def restore(engine, plan: TrainPlan) -> tuple[int, dict]:
    """Load the latest checkpoint into `engine` and this rank's RNGs; (steps already taken, the extra state
    given to `report`)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, {}
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    with checkpoint.as_directory() as folder:  # on local storage: the run's folder itself, read only
        with open(os.path.join(folder, LATEST)) as fh:
            tag = fh.read().strip()
        load_path, client = engine.load_checkpoint(folder, tag=tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {checkpoint.path} (tag {tag})")
        # each rank reads the shard files of its own rank: the layout is tied to the world size
        if client["world_size"] != world:
            raise RuntimeError(f"checkpoint {checkpoint.path} was written by {client['world_size']} workers; "
                               f"resume it with scaling.num_workers={client['world_size']} (now {world})")
        # the data position counts global batches: it means the same rows only if these did not change
        for key in ("global_batch_size", "steps_per_epoch"):
            if client[key] != getattr(plan, key):
                raise RuntimeError(f"checkpoint {checkpoint.path} has {key}={client[key]}, this run "
                                   f"{getattr(plan, key)}: the batch settings or the data changed")
        rng = torch.load(_rng_file(folder, rank), weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if "cuda" in rng:
        torch.cuda.set_rng_state_all(rng["cuda"])
    log.info(f"[train] rank {rank}: resumed from {checkpoint.path} after step {client['step']}")
    return int(client["step"]), client.get("state", {})
