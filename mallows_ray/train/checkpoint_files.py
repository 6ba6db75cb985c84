"""Checkpoint folders on storage: the completion record, finding the newest complete one, checking its files.

A checkpoint folder `<run_dir>/ckpt_stepNNNNNN/` is complete once the record `mallows_ray_checkpoint.json` is
in it: rank 0 writes it (atomically: a temp file, then a rename) after every rank's files have been uploaded.
It holds what a resume must agree with (step, world size, global batch, steps per epoch), the extra training
state, and every file's size and SHA-256 as its rank computed them before the upload. A folder without the
record (a save cut short by a crash or Ctrl+C) is never resumed from.

Resuming takes the newest complete checkpoint on storage, whatever Ray's own run snapshot
(`checkpoint_manager_snapshot.json`) lists: that snapshot is written after the files and lags them, so an
interrupt just after a save would otherwise restart from an older checkpoint, or from step 1.

No Ray, no torch: the driver checks a checkpoint before it launches any worker, so a mismatch or a damaged
file is one clear message in the terminal.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Any

import pyarrow.fs as pafs

RECORD = "mallows_ray_checkpoint.json"
STAGING = ".staging"  # in a local run folder: the ranks' checkpoint files before they are renamed into place
FORMAT = 1
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of reported checkpoints, in the run folder
_FOLDER = re.compile(r"ckpt_step(\d{6,})")
_CHUNK = 1 << 22


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the folder or file and what to do."""


def staging_dir(run_dir: str) -> str:
    """Where the ranks of a local run folder write a checkpoint before it is renamed into place; what a save cut
    short leaves there is removed when the run starts and ends (`clear_staging`)."""
    return os.path.join(run_dir, STAGING)


def clear_staging(run_dir: str) -> None:
    shutil.rmtree(staging_dir(run_dir), ignore_errors=True)


def folder_name(step: int) -> str:
    return f"ckpt_step{step:06d}"


def _sha256(stream) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def file_digests(folder: str) -> dict[str, list]:
    """{path relative to `folder`: [size in bytes, sha256 hex]} of every file under a local `folder`."""
    digests = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                digests[os.path.relpath(path, folder)] = [os.path.getsize(path), _sha256(fh)]
    return digests


def _filesystem(run_dir: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem and path of a local folder or a URI (s3://, gs://), as Ray's storage uses them."""
    return pafs.FileSystem.from_uri(run_dir)


def _read_json(fs: pafs.FileSystem, path: str, what: str) -> Any:
    try:
        with fs.open_input_stream(path) as fh:
            return json.loads(fh.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{what} {path} is damaged (not valid JSON: {err})") from None


def write_record(checkpoint_dir: str, record: dict[str, Any]) -> None:
    """Write the completion record of `checkpoint_dir` (a rename: readers see all of it or nothing)."""
    fs, path = _filesystem(checkpoint_dir)
    final, temp = f"{path}/{RECORD}", f"{path}/.{RECORD}.tmp"
    with fs.open_output_stream(temp) as fh:
        fh.write(json.dumps({"format": FORMAT, **record}, indent=1).encode("utf-8"))
    fs.move(temp, final)


def complete_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, folder) of every checkpoint folder under `run_dir` that has its completion record, oldest first."""
    fs, base = _filesystem(run_dir)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    found = []
    for info in fs.get_file_info(pafs.FileSelector(base)):
        match = _FOLDER.fullmatch(info.base_name)
        if match and info.type == pafs.FileType.Directory and \
                fs.get_file_info(f"{info.path}/{RECORD}").type == pafs.FileType.File:
            found.append((int(match.group(1)), f"{run_dir.rstrip('/')}/{info.base_name}"))
    return sorted(found)


def latest_complete(run_dir: str) -> tuple[str, dict[str, Any]] | None:
    """(folder, record) of the newest complete checkpoint of the run, or None when there is none."""
    found = complete_checkpoints(run_dir)
    if not found:
        return None
    step, folder = found[-1]
    fs, path = _filesystem(folder)
    record = _read_json(fs, f"{path}/{RECORD}", "checkpoint record")
    keys = ("format", "step", "tag", "world_size", "global_batch_size", "steps_per_epoch", "files")
    if not isinstance(record, dict) or any(key not in record for key in keys) or record["step"] != step:
        raise CheckpointError(f"checkpoint record {path}/{RECORD} is damaged (expected the keys {', '.join(keys)} "
                              f"and step {step}); move {folder} aside to resume from the checkpoint before it")
    if record["format"] != FORMAT:
        raise CheckpointError(f"checkpoint {folder} has record format {record['format']}; this version of "
                              f"mallows-ray reads format {FORMAT}")
    return folder, record


def check_compatible(record: dict[str, Any], folder: str, *, world_size: int, global_batch_size: int,
                     steps_per_epoch: int) -> None:
    """The run about to resume must have the world size (DeepSpeed's shard files are per rank) and the batch
    settings and data (the data position counts global batches) of the run that saved `folder`."""
    if record["world_size"] != world_size:
        raise CheckpointError(f"checkpoint {folder} was written by {record['world_size']} workers; resume it with "
                              f"scaling.num_workers={record['world_size']} (now {world_size}), or start a new run "
                              "under another run.name")
    for key, value in (("global_batch_size", global_batch_size), ("steps_per_epoch", steps_per_epoch)):
        if record[key] != value:
            raise CheckpointError(f"checkpoint {folder} has {key}={record[key]}, this run {value}: the batch settings "
                                  "(batch.micro_batch_size x batch.gradient_accumulation x scaling.num_workers) or "
                                  "the data changed; restore them, or start a new run under another run.name")


def check_files(folder: str, record: dict[str, Any], *, hashes: bool) -> None:
    """Every file the record lists is there as a regular file with its size (and with `hashes`, its SHA-256);
    raises `CheckpointError` naming the damaged files. Sizes are a stat per file; hashes read everything."""
    fs, path = _filesystem(folder)
    problems = []
    for name, (size, sha256) in sorted(record["files"].items()):
        file_path = f"{path}/{name}"
        if "://" not in folder and os.path.islink(file_path):  # a link could point outside the run folder
            problems.append(f"{file_path} is a link")
            continue
        info = fs.get_file_info(file_path)
        if info.type != pafs.FileType.File:
            problems.append(f"{file_path} is missing")
        elif info.size != size:
            problems.append(f"{file_path} has {info.size} bytes, {size} were written")
        elif hashes:
            with fs.open_input_stream(file_path) as fh:
                if _sha256(fh) != sha256:
                    problems.append(f"{file_path} differs from what was written (SHA-256)")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"checkpoint {folder} is damaged: {'; '.join(problems[:5])}{more}. Move the folder "
                              "aside to resume from the checkpoint before it")


def check_ray_snapshot(run_dir: str) -> None:
    """Ray reads its run snapshot when a run starts and fails without naming the file if it is damaged."""
    fs, base = _filesystem(run_dir)
    path = f"{base}/{RAY_SNAPSHOT}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return
    try:
        snapshot = _read_json(fs, path, "Ray's run snapshot")
    except CheckpointError as err:
        raise CheckpointError(f"{err}; delete that file to resume: mallows-ray resumes from the newest complete "
                              "checkpoint folder, which does not depend on it") from None
    if not isinstance(snapshot, dict) or "ray_version" not in snapshot:
        raise CheckpointError(f"Ray's run snapshot {path} is damaged (no ray_version); delete that file to resume: "
                              "mallows-ray resumes from the newest complete checkpoint folder without it")
