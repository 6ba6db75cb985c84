"""Rows 3-4, the Ray side: `prepare` on the reference actor pool, and prepare + one epoch of Ray training.

Modes:
  pool   tokenize + reference-score N HH pairs with `mallows_ray.data.pipeline.prepare` (actor pool); the
         timing starts after Ray is up (a cluster is started once, not per dataset).
  train  `run_training`: prepare + one epoch of DPO on one Ray Train worker with DeepSpeed (stage 0, fp32
         CPU), the same micro-batch and lengths as row 1; Ray start-up included, as a user would wait for it
         (imports and the choice of pairs are not, as on the TRL side). `--compile 1`: with model.compile,
         the worker compiling from an empty compile cache. `--dtype bfloat16`: model.dtype=bfloat16 (bf16
         forward and backward, fp32 master weights in DeepSpeed's optimizer; scoring in bf16 too).
Both read a JSONL of the raw HH lines of the same untruncated pairs the step rows use.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    Workload,
    emit,
    model_path,
    peak_rss_mib,
    quiet_libraries,
    untruncated_pairs,
    write_raw_pairs,
)


def config_overrides(data_file: Path, folder: Path, workload: Workload, actors: int, compiled: bool,
                     dtype: str = "float32") -> list[str]:
    return [
        f"data.train={data_file}", "data.format=hh", f"data.cache_dir={folder / 'cache'}",
        f"data.max_prompt_length={workload.max_prompt_length}",
        f"data.max_response_length={workload.max_response_length}",
        f"data.scoring.num_actors={actors}", "data.scoring.batch_size=8", f"model.dtype={dtype}",
        "loss.name=dpo", "loss.beta=0.1", "optim.epochs=1", "optim.lr=1.0e-6", "optim.schedule=constant",
        f"batch.micro_batch_size={workload.micro_batch}", "batch.gradient_accumulation=1",
        # the worker's torch threads: the step rows' thread count (the default, 0, would give it the same here:
        # the machine's CPUs over one worker); prepare's actors keep Ray's rule, one thread for 0.5 CPU each
        "deepspeed.zero_stage=0", "scaling.num_workers=1", "scaling.cpus_per_worker=1",
        f"scaling.threads_per_worker={workload.threads}",
        f"run.storage_path={folder / 'runs'}", "run.name=bench", "run.log_every=1000000", "export.enabled=false",
        f"model.compile={str(compiled).lower()}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["pool", "train"])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--actors", type=int, default=2, help="reference-scoring actors (data.scoring.num_actors)")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--max-prompt-length", type=int, default=64)
    parser.add_argument("--max-response-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", type=int, choices=[0, 1], default=0,
                        help="model.compile (train mode), compiled from an empty compile cache")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model.dtype")
    args = parser.parse_args()
    quiet_libraries()

    import ray

    from mallows_ray.config import load_config
    from mallows_ray.data.pipeline import prepare
    from mallows_ray.models import load_tokenizer
    from mallows_ray.runtime import ensure_ray

    workload = Workload(pairs=args.pairs, micro_batch=args.micro_batch, threads=args.threads,
                        max_prompt_length=args.max_prompt_length, max_response_length=args.max_response_length)
    rows = untruncated_pairs(load_tokenizer(model_path()), workload)
    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
        folder = Path(tmp)
        pairs_file = write_raw_pairs(rows, folder / "hh_pairs.jsonl")
        config = load_config(None, config_overrides(pairs_file, folder, workload, args.actors, bool(args.compile),
                                                   args.dtype))
        if args.compile:  # set before Ray starts: its worker processes inherit it
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
        ray_start = time.perf_counter()
        ensure_ray()
        ray_seconds = time.perf_counter() - ray_start
        if args.mode == "pool":
            t0 = time.perf_counter()
            manifest = prepare(config, force=True).manifest
            seconds = time.perf_counter() - t0
            result = {"mode": "pool", "rows": len(rows), "actors": args.actors, "seconds": seconds,
                      "rows_per_second": len(rows) / seconds, "ray_start_seconds": ray_seconds,
                      "manifest_seconds": manifest.get("seconds"),
                      "manifest_rows_per_second": manifest.get("rows_per_second")}
        else:
            from mallows_ray.drivers.train import run_training

            t0 = time.perf_counter()
            trained = run_training(config)
            result = {"mode": "train", "rows": len(rows), "seconds": time.perf_counter() - ray_start,
                      "seconds_after_ray": time.perf_counter() - t0,
                      "ray_start_seconds": ray_seconds, "steps": trained.plan.total_steps,
                      "final_loss": trained.metrics.get("loss"),
                      "train_tokens_per_s": trained.metrics.get("tokens_per_s")}
        ray.shutdown()
    result.update(peak_rss_mib_driver=peak_rss_mib())
    emit(result)


if __name__ == "__main__":
    main()
