"""The driver of `mallows-ray train`: scored data, a `TrainPlan`, and a Ray Train `TorchTrainer` around
`train_loop_per_worker`, whose workers run DeepSpeed on the policy.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from mallows_ray.config import Config, ScalingConfig
from mallows_ray.data import manifest as mf
from mallows_ray.data.cache import PreparedData, open_cache
from mallows_ray.data.pipeline import prepare
from mallows_ray.drivers import run_dir
from mallows_ray.models import resolve_model_path
from mallows_ray.runtime import check_local_resources, ensure_ray
from mallows_ray.train import checkpoint
from mallows_ray.train.plan import TrainPlan
from mallows_ray.typed_config import to_dict


@dataclass(frozen=True)
class TrainResult:
    metrics: dict[str, Any]        # rank 0's last report: train metrics, eval/* and params/*
    history: list[dict[str, Any]]  # rank 0's metrics per log step of the final attempt (a restart starts anew)
    checkpoint: str | None         # latest checkpoint folder (all ranks' DeepSpeed files)
    plan: TrainPlan                # data folder, step counts, run folder, export folder

    @property
    def run_dir(self) -> str:
        """Checkpoints ckpt_stepNNNNNN/, examples/rank*.jsonl."""
        return self.plan.run_dir

    @property
    def export_dir(self) -> str | None:
        """HF folder (with LoRA: the adapter; merged weights in <export>/merged when asked for)."""
        return self.plan.export_dir


def scored_data(config: Config, address: str | None) -> PreparedData:
    """`data.train` may name a scored cache folder (what `mallows-ray prepare` prints), checked against its
    manifest and re-gated by `data.max_bad_fraction` as a reused cache is; otherwise prepare."""
    folder = Path(config.data.train).expanduser()
    prepared = open_cache(folder, config.data.max_bad_fraction) if folder.is_dir() else None
    return prepared or prepare(config, address=address)


def make_plan(config: Config, prepared: PreparedData) -> TrainPlan:
    """Check the data against the loss and the settings; work out step counts and folders."""
    manifest = prepared.manifest
    if config.deepspeed.offload_params and config.deepspeed.zero_stage != 3:
        raise ValueError("deepspeed.offload_params needs deepspeed.zero_stage=3 (only ZeRO-3 partitions parameters)")
    loss = config.loss.build()
    if not loss.listwise and manifest["kind"] != "pairwise":
        raise ValueError(f"loss {loss.name!r} is pairwise but the data {prepared.folder} is "
                         f"{manifest['kind']}; use a listwise loss (listwise, plackett_luce)")
    if loss.listwise and not manifest.get("objectives"):
        raise ValueError(f"loss {loss.name!r} mixes objective scores by lambda, but the rows of "
                         f"{prepared.folder} carry none; give listwise data (scores: {{objective: [N numbers]}})")
    if config.run.eval_at_start and "validation" not in manifest["splits"]:
        raise ValueError(f"run.eval_at_start evaluates on the validation split, and the scored data "
                         f"{prepared.folder} has none (set data.validation)")
    rows = manifest["splits"]["train"]["rows_out"]
    batch = config.batch
    global_batch = batch.micro_batch_size * batch.gradient_accumulation * config.scaling.num_workers
    steps_per_epoch = rows // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{rows} training prompts do not fill one global batch of {global_batch} (batch."
                         "micro_batch_size x batch.gradient_accumulation x scaling.num_workers)")
    model_path = resolve_model_path(config.model.name_or_path)
    if mf.tokenizer_fingerprint(model_path) != manifest["tokenizer"]:
        raise ValueError(f"the scored data {prepared.folder} was tokenized with {manifest['tokenizer_path']}, "
                         f"whose tokenizer differs from that of model {config.model.name_or_path}")
    total_steps = config.optim.max_steps or config.optim.epochs * steps_per_epoch
    if config.optim.warmup_steps >= total_steps:
        raise ValueError(f"optim.warmup_steps={config.optim.warmup_steps} is not below the run's {total_steps} "
                         "optimizer steps: the learning rate would never leave its warmup")
    storage = config.run.storage_path
    if "://" not in storage:  # Ray needs an absolute local path or a URI
        storage = os.path.abspath(os.path.expanduser(storage))
    export_dir = None
    if config.export.enabled:
        export_dir = config.export.path or f"{storage.rstrip('/')}/{config.run.name}/export"
    return TrainPlan(
        model_path=str(model_path),
        data_folder=str(prepared.folder),
        has_validation="validation" in manifest["splits"],
        train_rows=rows,
        global_batch_size=global_batch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        storage_path=storage,
        run_name=config.run.name,
        export_dir=export_dir,
        objectives=manifest.get("objectives") or [],
        dispersion_scale=manifest["dispersion_scale"],
    )


def check_splits(plan: TrainPlan) -> None:
    """Open the scored splits the workers will read (footers only: no row is read on the driver), so that a
    missing column or a row count other than the manifest's stops the run here, naming the file."""
    train = plan.open_split("train")
    if len(train) != plan.train_rows:
        raise ValueError(f"{train.folder} holds {len(train)} rows, its manifest {plan.train_rows}: the scored "
                         "data changed after it was prepared; run `mallows-ray prepare` again")
    if plan.has_validation:
        plan.open_split("validation")


WORKER_RESOURCE_KEYS = {"CPU": "cpus_per_worker", "GPU": "gpus_per_worker"}  # the scaling setting of each


def worker_resources(scaling: ScalingConfig) -> dict[str, float]:
    """What each Ray Train worker reserves: {"CPU": scaling.cpus_per_worker, "GPU": scaling.gpus_per_worker
    with scaling.use_gpu}."""
    return {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}


def build_trainer(config: Config, plan: TrainPlan, *, callbacks: Sequence[Any] = ()) -> Any:
    """The `TorchTrainer` of one training run: `train_loop_per_worker` on `scaling.num_workers` workers.

    Shared by `mallows-ray train` and every trial of `mallows-ray tune` (which adds Tune's report callback),
    so a sweep trial trains exactly as the same config would alone. No Ray Dataset: every worker reads its
    rows of the scored parquet in `plan.data_folder` itself (`data/scored_split.py`, `batches.epoch_order`).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from mallows_ray.train.loop import train_loop_per_worker  # imported here: it imports Ray Train and DeepSpeed

    scaling = config.scaling
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(config), "plan": asdict(plan)},
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                               resources_per_worker=worker_resources(scaling)),
        run_config=ray.train.RunConfig(
            name=plan.run_name, storage_path=plan.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.run.keep_checkpoints),
            callbacks=list(callbacks),
        ),
    )


def run_training(config: Config, *, address: str | None = None) -> TrainResult:
    """Prepare (or reuse) the scored data, train with DeepSpeed on Ray Train workers, export.

    Joins `address` / $RAY_ADDRESS, else starts a local Ray instance. Running again with the same
    `run.name` and `run.storage_path` resumes from that run's newest complete checkpoint, after checking it
    against this run's settings here, before any worker starts (`checkpoint.check_resume`).
    """
    ensure_ray(address)
    # before prepare: a worker group that can never start fails now, not after the scoring
    check_local_resources(("scaling.num_workers", config.scaling.num_workers),
                          {name: (WORKER_RESOURCE_KEYS[name], amount)
                           for name, amount in worker_resources(config.scaling).items()})
    prepared = scored_data(config, address)
    plan = make_plan(config, prepared)
    run_dir.claim(plan)
    record = checkpoint.check_resume(plan, config.scaling.num_workers)
    if record is not None:
        print(f"[train] resuming {plan.run_dir} from its newest complete checkpoint, after step {record['step']} "
              f"of {plan.total_steps}", flush=True)
    check_splits(plan)
    with checkpoint.staging_cleared(plan):
        result = build_trainer(config, plan).fit()  # raises TrainingFailedError once max_failures are used up
    history = result.return_value or []
    return TrainResult(
        metrics=history[-1] if history else (result.metrics or {}),
        history=history,
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        plan=plan,
    )
