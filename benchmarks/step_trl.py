"""Row 1-2, TRL side: `trl.DPOTrainer` on the same HH pairs, lengths and micro-batch, fp32 on CPU
(`--device cuda --dtype bfloat16`: on the GPU in bf16, for gpu_check.py).

Modes: TRL's default (a reference model kept in memory and run forward every step) and
`precompute_ref_log_probs=True` (one reference pass over the dataset before training, outside the timing).
Both in fp32 (TRL's bf16 default off) and without gradient checkpointing (TRL's default on, mallows_ray's off).
Step time = the interval between consecutive `on_step_end` callbacks, so it includes TRL's data loading and
collation as the mallows_ray step includes its collate; tokens per step = the batch's attention-mask sum.

With --epoch (row 4) it instead times TRL's whole job on the pairs: trainer construction (tokenization and,
when precomputing, the reference pass) plus one epoch of training, after imports and the choice of pairs.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from benchmarks.common import (
    add_allocator_arg,
    add_device_args,
    add_workload_args,
    apply_allocator,
    emit,
    median,
    model_path,
    peak_gpu_mib,
    peak_rss_mib,
    quiet_libraries,
    set_threads,
    synchronize,
    trl_rows,
    untruncated_pairs,
    workload_from_args,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_workload_args(parser)
    parser.add_argument("--precompute", action="store_true", help="precompute_ref_log_probs=True")
    parser.add_argument("--epoch", action="store_true", help="row 4: time construction + one epoch")
    add_device_args(parser)
    add_allocator_arg(parser, "glibc")
    args = parser.parse_args()
    apply_allocator(args.allocator, "benchmarks.step_trl")
    workload = workload_from_args(args)
    quiet_libraries()
    set_threads(workload.threads)

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from mallows_ray.models import load_model, load_tokenizer

    path = model_path()
    tokenizer = load_tokenizer(path)
    rows = untruncated_pairs(tokenizer, workload)
    started = time.perf_counter()  # row 4 counts from here: model load, tokenization, (reference pass,) epoch
    step_ends: list[float] = []
    step_cpu_ends: list[float] = []
    step_tokens: list[int] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs):
            synchronize(args.device)  # a GPU step is over when its kernels are
            step_ends.append(time.perf_counter())
            step_cpu_ends.append(time.process_time())

    class CountingDPOTrainer(DPOTrainer):
        """Counts the non-padding tokens of every training micro-batch (policy sequences, chosen + rejected)."""

        def training_step(self, model, inputs, *rest, **kwargs):
            step_tokens.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, *rest, **kwargs)

    total_steps = workload.warmup_steps + workload.measured_steps
    with tempfile.TemporaryDirectory(prefix="bench_trl_") as out_dir:
        config = DPOConfig(
            output_dir=out_dir, per_device_train_batch_size=workload.micro_batch, gradient_accumulation_steps=1,
            max_length=workload.max_length, max_steps=-1 if args.epoch else total_steps, num_train_epochs=1,
            learning_rate=1e-6, beta=0.1,
            precompute_ref_log_probs=args.precompute, use_cpu=args.device == "cpu",
            bf16=args.dtype == "bfloat16", fp16=False, report_to=[],
            gradient_checkpointing=False,  # TRL defaults it on; mallows_ray's default is off: compare like with like
            logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0, train_sampling_strategy="sequential", seed=0,
        )
        trainer = CountingDPOTrainer(
            model=load_model(path, getattr(torch, args.dtype)), args=config, processing_class=tokenizer,
            train_dataset=Dataset.from_list(trl_rows(rows)), callbacks=[StepClock()],
        )
        trainer.train()
    if args.epoch:
        emit({"framework": "trl", "mode": "precompute" if args.precompute else "default",
              "rows": len(rows), "steps": len(step_ends), "seconds_in_process": time.perf_counter() - started,
              "peak_rss_mib": peak_rss_mib()})
        return
    # interval k = end of step k - end of step k-1; the first `warmup_steps` steps are not measured
    seconds = [b - a for a, b in zip(step_ends[workload.warmup_steps - 1:], step_ends[workload.warmup_steps:])]
    cpu_seconds = [b - a for a, b in zip(step_cpu_ends[workload.warmup_steps - 1:],
                                         step_cpu_ends[workload.warmup_steps:])]
    tokens = step_tokens[workload.warmup_steps:]
    emit({
        "framework": "trl", "mode": "precompute_ref_log_probs=True" if args.precompute else "default",
        "step_seconds": seconds, "step_cpu_seconds": cpu_seconds, "step_tokens": tokens,
        "median_step_s": median(seconds), "tokens_per_s": sum(tokens) / sum(seconds),
        "median_tokens_per_s": median([t / s for t, s in zip(tokens, seconds)]),
        "median_tokens_per_cpu_s": median([t / s for t, s in zip(tokens, cpu_seconds)]),
        "device": args.device, "dtype": args.dtype, "peak_gpu_mib": peak_gpu_mib(),
        "peak_rss_mib": peak_rss_mib(), "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "reference_forwards_per_step": 0 if args.precompute else 1,
    })


if __name__ == "__main__":
    main()
