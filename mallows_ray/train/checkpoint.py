"""Checkpoints through Ray Train: DeepSpeed's per-rank files, RNG states, the data position, a completion record.

Saving: every rank writes its own shards into a private temp folder (`engine.save_checkpoint`, no gather to
one rank), its RNG states (safetensors) and the sizes and SHA-256 of its files, and reports the folder with
the same `checkpoint_dir_name`; all ranks' files end up in one `<run_dir>/ckpt_stepNNNNNN/` folder
(DeepSpeed's file names carry the rank, so they never collide) before `report` returns. On a local or mounted
run folder the temp folder is in the run folder's `.staging/` and the files are renamed into place
(`_move_into_run_dir`); on remote storage (s3://, gs://) Ray uploads them. Rank 0 then gathers
the ranks' file lists and writes the completion record (`checkpoint_files.py`). The LR scheduler is saved by
the engine, which owns it. The data position is the number of optimizer steps taken: with the deterministic
global-batch order of `batches.py` that pins down the epoch and the batch within it (`TrainPlan.position`).

Restoring: the newest complete checkpoint in the run folder, both after a worker failure (`FailureConfig`
restart) and when a new driver runs the same `run.name` and `run.storage_path` again; the driver checks it
first (`check_resume`). DeepSpeed loads only that folder, with `torch.load(weights_only=True)` (`safe_state.py`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator

import pyarrow.fs as pafs
import ray.train
import torch

from mallows_ray.train import checkpoint_files as files
from mallows_ray.train.plan import TrainPlan
from mallows_ray.train.safe_state import load_rng, rng_file, save_rng, weights_only_loading

log = logging.getLogger(__name__)


def report(metrics: dict, engine, plan: TrainPlan, step: int, *, save: bool, state: dict | None = None) -> None:
    """`ray.train.report(metrics)` from every rank, with a checkpoint of the state after `step` when `save`;
    `state` is extra JSON-able training state (the lambda scheduler's) that `restore` hands back.

    All ranks must call this the same number of times: the report is a barrier, and saving is collective.
    """
    if not save:
        ray.train.report(metrics)
        return
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # per rank: the save would clash in a shared one; beside the checkpoints on a local run folder, so that its
    # files are renamed into place instead of copied (SmolLM2 with AdamW: 1.6 GB, ~4 s a checkpoint on CPU)
    staging = files.staging_dir(plan.run_dir) if plan.local_run_dir else None
    if staging is not None:
        os.makedirs(staging, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=f"mallows_ckpt_r{rank}_", dir=staging)
    tag = f"step{step}"
    engine.save_checkpoint(folder, tag=tag)
    save_rng(rng_file(folder, rank))
    digests = files.file_digests(folder)  # before the upload: what this rank wrote, as it wrote it
    name = files.folder_name(step)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                     checkpoint_dir_name=name, delete_local_checkpoint_after_upload=True,
                     checkpoint_upload_fn=_move_into_run_dir(plan.run_dir) if plan.local_run_dir else None)
    # every rank's files are on storage once every rank is past its report (the upload is synchronous)
    gathered = [None] * world if rank == 0 else None
    torch.distributed.gather_object(digests, gathered, dst=0)
    if rank == 0:
        record = {"step": step, "tag": tag, "world_size": world, "global_batch_size": plan.global_batch_size,
                  "steps_per_epoch": plan.steps_per_epoch, "state": state or {},
                  "files": {path: value for rank_files in gathered for path, value in rank_files.items()}}
        files.write_record(f"{plan.run_dir}/{name}", record)


def _move_into_run_dir(run_dir: str):
    """Ray's `checkpoint_upload_fn` for a local run folder: rename the rank's files from its staging folder into
    `<run_dir>/<checkpoint_dir_name>/` (one filesystem: a rename each, nothing copied) and hand Ray that folder."""

    def move(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        target = os.path.join(run_dir, dir_name)
        for root, _, names in os.walk(checkpoint.path):
            into = os.path.join(target, os.path.relpath(root, checkpoint.path))
            os.makedirs(into, exist_ok=True)
            for name in names:
                shutil.move(os.path.join(root, name), os.path.join(into, name))
        return ray.train.Checkpoint(target)

    return move


@contextmanager
def staging_cleared(plan: TrainPlan) -> Iterator[None]:
    """Driver, around training: a local run folder's checkpoint staging folder is removed before (what a save
    cut short by a crash left) and after (a failed save's files)."""
    if plan.local_run_dir:
        files.clear_staging(plan.run_dir)
    try:
        yield
    finally:
        if plan.local_run_dir:
            files.clear_staging(plan.run_dir)


def check_resume(plan: TrainPlan, world_size: int) -> dict | None:
    """Driver, before any worker starts: the record of the checkpoint the run will resume from (None: a fresh
    start), after checking it against this run and hashing its files. Raises `CheckpointError`."""
    files.check_ray_snapshot(plan.run_dir)
    found = files.latest_complete(plan.run_dir)
    if found is None:
        return None
    folder, record = found
    files.check_compatible(record, folder, world_size=world_size, global_batch_size=plan.global_batch_size,
                           steps_per_epoch=plan.steps_per_epoch)
    files.check_files(folder, record, hashes=True)
    return record


def restore(engine, plan: TrainPlan) -> tuple[int, dict]:
    """Load the newest complete checkpoint into `engine` and this rank's RNGs; (steps already taken, the extra
    state given to `report`)."""
    found = files.latest_complete(plan.run_dir)
    if found is None:
        return 0, {}
    folder, record = found
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # before DeepSpeed reads anything: its errors on a mismatch do not say what is wrong
    files.check_compatible(record, folder, world_size=world, global_batch_size=plan.global_batch_size,
                           steps_per_epoch=plan.steps_per_epoch)
    files.check_files(folder, record, hashes=False)  # sizes only: the driver hashed them before launching
    fs, path = pafs.FileSystem.from_uri(folder)
    with ray.train.Checkpoint(path, filesystem=fs).as_directory() as local:  # local storage: the folder itself
        try:
            with weights_only_loading(engine):
                load_path, _ = engine.load_checkpoint(local, tag=record["tag"], load_optimizer_states=True,
                                                      load_lr_scheduler_states=True)
        except files.CheckpointError:
            raise
        except Exception as err:
            raise files.CheckpointError(f"DeepSpeed could not load checkpoint {folder}: {type(err).__name__}: "
                                        f"{err}") from err
        if load_path is None:
            raise files.CheckpointError(f"DeepSpeed could not load checkpoint {folder} (tag {record['tag']})")
        load_rng(rng_file(local, rank))
    log.info(f"[train] rank {rank}: resumed from {folder} after step {record['step']}")
    return int(record["step"]), record.get("state", {})
