"""What the driver works out once and every worker needs: where things are and how many steps to take.

Workers read nothing global (DESIGN.md): the driver resolves the model folder, the scored data, the run
folder and the step counts, and ships them with the config in `train_loop_config`.
"""

from __future__ import annotations

from dataclasses import dataclass

from mallows_ray.data.scored_split import ScoredSplit


@dataclass(frozen=True)
class TrainPlan:
    model_path: str         # local HF folder of the policy's starting weights (normally the reference)
    data_folder: str        # scored parquet cache: <folder>/train, <folder>/validation
    has_validation: bool
    train_rows: int
    global_batch_size: int  # prompts per optimizer step = micro batch x gradient accumulation x workers
    steps_per_epoch: int    # full global batches per pass over train (the incomplete last one is dropped)
    total_steps: int        # optimizer steps of the whole run (the LR schedule's horizon)
    storage_path: str       # absolute local path or URI (Ray's RunConfig.storage_path)
    run_name: str
    export_dir: str | None  # HF export folder; None when export is disabled
    objectives: list[str]   # listwise data: the K objectives in score order (the lambda order); [] for pairwise
    dispersion_scale: float  # c of the scored data (its manifest): s(x) = -c log Hbar(x)

    @property
    def run_dir(self) -> str:
        """<storage_path>/<name>: Ray's checkpoints, the example logs, the failure marker."""
        return f"{self.storage_path.rstrip('/')}/{self.run_name}"

    @property
    def local_run_dir(self) -> bool:
        """Whether the run folder is on a local or mounted filesystem (not a URI such as s3://)."""
        return "://" not in self.storage_path

    def open_split(self, split: str) -> ScoredSplit:
        """A scored split ("train", "validation"), which every worker reads itself (footers only until `take`)."""
        return ScoredSplit(f"{self.data_folder}/{split}", self.dispersion_scale)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, global batches already consumed in that epoch) after `step` optimizer steps."""
        return divmod(step, self.steps_per_epoch)
