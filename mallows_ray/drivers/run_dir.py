"""Run folders: `<run.storage_path>/<run.name>`, marked as made by this program, and the only thing it deletes.

The driver claims the run folder before training (`claim`): a new or empty folder gets the marker file
`.mallows_ray_run`; a folder with the marker is an earlier run of the same name, which training resumes; a
folder with other contents and no marker is not ours, and the run stops rather than write into it.
`delete` (the demo's `--fresh`) removes a folder only when it carries the marker, is a real folder (not a link)
and is named by a plain `run.name` (config.check_run_name): never the storage folder, a parent or a sibling.
Folders on a URI (s3://, gs://) are left to Ray: they are never deleted, and claiming them checks nothing.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from mallows_ray.train.plan import TrainPlan

MARKER = ".mallows_ray_run"


class RunFolderError(ValueError):
    """A run folder that this program must not write into or delete; the message names it and the way out."""


def is_ours(folder: Path) -> bool:
    return not folder.is_symlink() and folder.is_dir() and (folder / MARKER).is_file()


def claim(plan: TrainPlan) -> bool:
    """Mark the run folder as this program's (creating it); True when it already held an earlier run of ours."""
    if not plan.local_run_dir:
        return False
    folder = Path(plan.run_dir)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise RunFolderError(f"run folder {folder} is a link or a file, not a folder; choose another run.name "
                             "or run.storage_path")
    if is_ours(folder):
        return True
    if folder.is_dir() and any(folder.iterdir()):
        raise RunFolderError(f"run folder {folder} exists and was not made by mallows-ray (no {MARKER} file); "
                             "it is left as it is: choose another run.name or run.storage_path")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(json.dumps({"run_name": plan.run_name, "created": time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
    return False


def delete(folder: Path) -> None:
    """Delete the run folder `folder` (a marked run of this program) or raise `RunFolderError` and touch nothing."""
    folder = Path(folder)
    if not is_ours(folder):
        raise RunFolderError(f"{folder} is not a run folder made by mallows-ray (no {MARKER} file, or a link); "
                             "it is not deleted: remove it yourself or choose another run.name")
    shutil.rmtree(folder)
