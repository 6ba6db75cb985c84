"""Run folders, checkpoint completion records and resume state, without Ray: what is deleted (only marked run
folders), which checkpoint a resume takes (the newest complete one), damaged files named, no pickle loading."""

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mallows_ray.drivers import run_dir
from mallows_ray.train import checkpoint_files as files
from mallows_ray.train.plan import TrainPlan
from mallows_ray.train.safe_state import load_rng, load_weights_only, save_rng


def _plan(storage, name="run"):
    return TrainPlan(model_path="m", data_folder="d", has_validation=False, train_rows=8, global_batch_size=4,
                     steps_per_epoch=2, total_steps=4, storage_path=str(storage), run_name=name, export_dir=None,
                     objectives=[], dispersion_scale=1.0)


# ---- run folders


def test_claim_marks_a_new_folder_resumes_a_marked_one_and_refuses_a_foreign_one(tmp_path):
    plan = _plan(tmp_path)
    assert run_dir.claim(plan) is False and (tmp_path / "run" / run_dir.MARKER).is_file()
    assert run_dir.claim(plan) is True  # the same run again: resumed
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(run_dir.RunFolderError, match=f"run folder {foreign} exists and was not made by mallows-ray"):
        run_dir.claim(_plan(tmp_path, "theirs"))
    assert (foreign / "notes.txt").read_text() == "x" and not (foreign / run_dir.MARKER).exists()
    (tmp_path / "empty").mkdir()
    assert run_dir.claim(_plan(tmp_path, "empty")) is False  # an empty folder is taken


def test_delete_removes_only_a_marked_real_folder(tmp_path):
    run_dir.claim(_plan(tmp_path))
    (tmp_path / "run" / "ckpt_step000002").mkdir()
    sibling = tmp_path / "sibling"
    sibling.mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "run")
    with pytest.raises(run_dir.RunFolderError, match="not a run folder made by mallows-ray"):
        run_dir.delete(link)  # a link to a run folder is not deleted, nor is its target
    with pytest.raises(run_dir.RunFolderError):
        run_dir.delete(sibling)
    with pytest.raises(run_dir.RunFolderError):
        run_dir.delete(tmp_path)  # the storage folder itself
    assert (tmp_path / "run" / "ckpt_step000002").is_dir() and sibling.is_dir()
    run_dir.delete(tmp_path / "run")
    assert not (tmp_path / "run").exists() and sibling.is_dir() and tmp_path.is_dir()


# ---- completion records


def _checkpoint(run, step, world=2, complete=True):
    folder = run / files.folder_name(step)
    folder.mkdir(parents=True)
    for rank in range(world):
        (folder / f"shard_rank{rank}.bin").write_bytes(bytes([rank, step]) * 100)
    if complete:
        files.write_record(str(folder), {"step": step, "tag": f"step{step}", "world_size": world,
                                         "global_batch_size": 4, "steps_per_epoch": 2, "state": {"k": step},
                                         "files": files.file_digests(str(folder))})
    return folder


def test_resume_takes_the_newest_complete_checkpoint(tmp_path):
    assert files.latest_complete(str(tmp_path / "absent")) is None
    _checkpoint(tmp_path, 2)
    newest = _checkpoint(tmp_path, 4)
    _checkpoint(tmp_path, 6, complete=False)  # cut short: all files, no record
    (tmp_path / "ckpt_step000008").mkdir()     # cut short earlier
    folder, record = files.latest_complete(str(tmp_path))
    assert folder == str(newest) and record["step"] == 4 and record["state"] == {"k": 4}
    assert [step for step, _ in files.complete_checkpoints(str(tmp_path))] == [2, 4]
    assert not list(newest.glob(".*.tmp"))  # the record was renamed into place


def test_world_size_and_batch_mismatches_name_the_checkpoint_and_the_fix(tmp_path):
    folder, record = str(_checkpoint(tmp_path, 4)), None
    _, record = files.latest_complete(str(tmp_path))
    with pytest.raises(files.CheckpointError, match=rf"checkpoint {folder} was written by 2 workers; resume it with "
                       r"scaling.num_workers=2 \(now 1\)"):
        files.check_compatible(record, folder, world_size=1, global_batch_size=4, steps_per_epoch=2)
    with pytest.raises(files.CheckpointError, match="global_batch_size=4, this run 8"):
        files.check_compatible(record, folder, world_size=2, global_batch_size=8, steps_per_epoch=2)
    files.check_compatible(record, folder, world_size=2, global_batch_size=4, steps_per_epoch=2)


def test_damaged_files_are_named(tmp_path):
    folder = _checkpoint(tmp_path, 4)
    _, record = files.latest_complete(str(tmp_path))
    files.check_files(str(folder), record, hashes=True)
    shard = folder / "shard_rank1.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF  # same size, other bytes: only the hash sees it
    shard.write_bytes(bytes(data))
    files.check_files(str(folder), record, hashes=False)
    with pytest.raises(files.CheckpointError, match=f"{shard} differs from what was written"):
        files.check_files(str(folder), record, hashes=True)
    shard.write_bytes(b"short")
    with pytest.raises(files.CheckpointError, match=f"{shard} has 5 bytes, 200 were written"):
        files.check_files(str(folder), record, hashes=False)
    (folder / "shard_rank0.bin").unlink()
    with pytest.raises(files.CheckpointError, match=f"{folder / 'shard_rank0.bin'} is missing"):
        files.check_files(str(folder), record, hashes=False)


def test_a_damaged_record_or_ray_snapshot_is_named(tmp_path):
    folder = _checkpoint(tmp_path, 4)
    (folder / files.RECORD).write_text('{"step": 4, "tag"')
    with pytest.raises(files.CheckpointError, match=f"checkpoint record {folder / files.RECORD} is damaged"):
        files.latest_complete(str(tmp_path))
    files.check_ray_snapshot(str(tmp_path))  # none: fine
    (tmp_path / files.RAY_SNAPSHOT).write_text(json.dumps({"ray_version": "2.60.0", "checkpoint_results": []}))
    files.check_ray_snapshot(str(tmp_path))
    (tmp_path / files.RAY_SNAPSHOT).write_text('{"ray_version": "2.6')
    with pytest.raises(files.CheckpointError, match=f"Ray's run snapshot {tmp_path / files.RAY_SNAPSHOT} is damaged"):
        files.check_ray_snapshot(str(tmp_path))


# ---- resume state without pickle


def test_rng_states_round_trip_through_safetensors(tmp_path):
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    np.random.standard_normal()  # numpy now caches a gaussian: part of its state
    path = str(tmp_path / "rng_rank0.safetensors")
    save_rng(path)
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    load_rng(path)
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected
    with open(path, "rb") as fh:
        assert b"\x80\x04" not in fh.read(64)  # a safetensors JSON header, not a pickle
    with open(path, "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(files.CheckpointError, match=f"RNG state file {path} is damaged"):
        load_rng(path)


class _Payload:
    """A pickle that runs code while it loads (what a writer of the storage folder could plant)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_deepspeed_files_load_as_data_only(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    good = tmp_path / "optim_states.pt"
    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                "fragment": fragment_address(numel=3, start=0), "state": {"exp_avg": torch.ones(2)}}, good)
    loaded = load_weights_only(str(good))
    assert loaded["zero_stage"] == ZeroStageEnum.gradients and loaded["loss_scaler"].cur_scale == 1.0
    assert torch.equal(loaded["state"]["exp_avg"], torch.ones(2))

    marker = tmp_path / "code_ran"
    evil = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(1)}, "x": _Payload(str(marker))}, evil)
    with pytest.raises(files.CheckpointError, match=f"checkpoint file {evil} was not loaded: UnpicklingError: "
                       r".*GLOBAL posix.mkdir.* \(only tensors, plain values"):
        load_weights_only(str(evil))
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # what DeepSpeed itself would do: the payload is real
    assert marker.is_dir()
    evil.write_bytes(evil.read_bytes()[:50])  # damaged
    with pytest.raises(files.CheckpointError, match=f"checkpoint file {evil} was not loaded"):
        load_weights_only(str(evil))


def test_demo_replaces_an_earlier_run_only_when_asked_and_only_a_marked_one(tmp_path):
    from mallows_ray.demo.run import start_fresh

    start_fresh(tmp_path / "none", fresh=False)  # nothing there: nothing to do
    run_dir.claim(_plan(tmp_path, "demo"))
    (tmp_path / "data").mkdir()
    with pytest.raises(run_dir.RunFolderError, match="holds an earlier demo run.*add --fresh"):
        start_fresh(tmp_path / "demo", fresh=False)
    assert (tmp_path / "demo").is_dir()
    start_fresh(tmp_path / "demo", fresh=True)
    assert not (tmp_path / "demo").exists() and (tmp_path / "data").is_dir()


def test_a_local_checkpoint_is_renamed_into_the_run_folder_not_copied(tmp_path):
    from ray.train import Checkpoint

    from mallows_ray.train.checkpoint import _move_into_run_dir

    staged = tmp_path / "run" / files.STAGING / "mallows_ckpt_r1_x"
    (staged / "step4").mkdir(parents=True)
    (staged / "step4" / "mp_rank_01_model_states.pt").write_bytes(b"weights")
    (staged / "rng_rank1.safetensors").write_bytes(b"rng")
    inodes = {p.name: p.stat().st_ino for p in staged.rglob("*") if p.is_file()}
    moved = _move_into_run_dir(str(tmp_path / "run"))(Checkpoint(str(staged)), "ckpt_step000004")
    target = tmp_path / "run" / "ckpt_step000004"
    assert Path(moved.path) == target
    assert (target / "step4" / "mp_rank_01_model_states.pt").read_bytes() == b"weights"
    assert {p.name: p.stat().st_ino for p in target.rglob("*") if p.is_file()} == inodes  # the same files
    assert not [p for p in staged.rglob("*") if p.is_file()]
