"""Row 1-2, mallows_ray side: the training step the Ray workers run, in one process without Ray or DeepSpeed.

One step = collate a micro-batch of scored rows, `forward_loss` through `PolicyLogprobs` (transformer body +
chunked log-prob head), backward, the training engine's AdamW step (`engine.build_optimizer`, fused) clipping
the gradients to norm 1.0 as a one-rank fp32 worker's does (`engine.grad_norm`, `engine.clipped_in_step`).
Reference log-probs are a column of the scored data, so here they are computed once beforehand with the same
forward under no_grad, outside the timed region.
`--share-prompt 0` packs one row per response instead of each prompt once (model.share_prompt=false); `--pack 1`
lays the micro-batch's prompts end to end in one row (model.pack); `--compile 1` compiles the transformer body
(model.compile; the warm-up steps include the compiling, `warmup_seconds`). `--device cuda --dtype bfloat16`:
the GPU step (gpu_check.py), with its peak GPU memory; there a packed row runs torch's varlen flash kernel
(`attention.VARLEN`), and `--attention grouped` runs it group by group under masks instead (the CPU's path).

Tokens per step are the pair sequences' tokens, a prompt counted once per response (the unit TRL's
attention-mask count uses); `model_tokens` are those the model actually ran (fewer with a shared prompt).
"""

from __future__ import annotations

import argparse
import os
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
    step_rows,
    synchronize,
    untruncated_pairs,
    workload_from_args,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_workload_args(parser)
    parser.add_argument("--share-prompt", type=int, choices=[0, 1], default=1, help="model.share_prompt")
    parser.add_argument("--pack", type=int, choices=[0, 1], default=0, help="model.pack")
    parser.add_argument("--compile", type=int, choices=[0, 1], default=0, help="model.compile")
    parser.add_argument("--attention", choices=["varlen", "grouped"], default="varlen",
                        help="varlen: the default (the varlen kernel on a GPU in bf16, grouped elsewhere); grouped: "
                             "attention.GROUPED_SDPA everywhere")
    add_device_args(parser)
    add_allocator_arg(parser, "workers")
    args = parser.parse_args()
    apply_allocator(args.allocator, "benchmarks.step_mallows")
    workload = workload_from_args(args)
    share, pack = bool(args.share_prompt), bool(args.pack)
    quiet_libraries()
    set_threads(workload.threads)
    if args.compile:  # an empty compile cache, so the first step's time is what compiling costs from nothing
        cache = tempfile.TemporaryDirectory(prefix="mallows-ray-bench-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name

    import torch

    from mallows_ray.attention import GROUPED_SDPA, varlen_applies
    from mallows_ray.config import OptimConfig
    from mallows_ray.data.collate import pack_responses
    from mallows_ray.losses import build_loss
    from mallows_ray.models import compile_layers, load_model, load_tokenizer, response_stats
    from mallows_ray.train.batches import collate
    from mallows_ray.train.engine import PolicyLogprobs, build_optimizer, clipped_in_step, grad_norm
    from mallows_ray.train.objective import forward_loss

    path = model_path()
    tokenizer = load_tokenizer(path)
    rows = untruncated_pairs(tokenizer, workload)
    device = torch.device(args.device)
    lm = load_model(path, getattr(torch, args.dtype)).to(device)
    if args.attention == "grouped":
        lm.set_attn_implementation(GROUPED_SDPA)
    lm.config.use_cache = False
    with torch.no_grad():  # the scored data's ref_logps column, as prepare would write it
        for row in rows:
            packed = pack_responses([row["prompt_ids"]], [row["response_ids"]], tokenizer.pad_token_id).to(device)
            stats = response_stats(lm, **packed.model_inputs(), with_entropy=False)
            row.update(ref_logps=stats.logp_sum.tolist(), dispersion=1.0)

    if args.compile:  # after the reference pass above, which scoring runs eagerly too
        compile_layers(lm)
    policy = PolicyLogprobs(lm, zero_stage=0).train()
    optimizer = build_optimizer(list(policy.parameters()), OptimConfig(lr=1e-6))
    loss_fn = build_loss("dpo", beta=0.1)
    n_params = sum(p.numel() for p in policy.parameters())

    seconds, cpu_seconds, tokens, model_tokens, warmup_seconds = [], [], [], [], []
    for step in range(workload.warmup_steps + workload.measured_steps):
        batch_rows = step_rows(rows, step, workload.micro_batch)
        synchronize(args.device)
        t0, c0 = time.perf_counter(), time.process_time()
        batch = collate(batch_rows, tokenizer.pad_token_id, with_scores=False, share_prompt=share,
                        pack=pack).to(device)
        loss = forward_loss(policy, batch, loss_fn).losses.mean()
        loss.backward()
        with clipped_in_step(optimizer, grad_norm([p.grad for p in policy.parameters()]), 1.0):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(args.device)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        if step < workload.warmup_steps:
            warmup_seconds.append(elapsed)
        else:
            seconds.append(elapsed)
            cpu_seconds.append(cpu)
            tokens.append(batch.tokens)
            model_tokens.append(batch.packed.model_tokens)
    emit({
        "framework": "mallows_ray", "device": args.device, "dtype": args.dtype,
        "mode": "reference precomputed" + (", shared prompt" if share else "") + (", packed" if pack else "")
        + (", compiled" if args.compile else ""), "varlen_attention": pack and varlen_applies(lm, device),
        "warmup_seconds": warmup_seconds,
        "step_seconds": seconds, "step_cpu_seconds": cpu_seconds, "step_tokens": tokens,
        "step_model_tokens": model_tokens, "model_tokens_per_s": sum(model_tokens) / sum(seconds),
        "median_model_tokens_per_s": median([t / s for t, s in zip(model_tokens, seconds)]),
        "median_step_s": median(seconds), "tokens_per_s": sum(tokens) / sum(seconds),
        "median_tokens_per_s": median([t / s for t, s in zip(tokens, seconds)]),
        "median_tokens_per_cpu_s": median([t / s for t, s in zip(tokens, cpu_seconds)]),
        "peak_rss_mib": peak_rss_mib(), "peak_gpu_mib": peak_gpu_mib(), "parameters": n_params,
        "reference_forwards_per_step": 0,
    })


if __name__ == "__main__":
    main()
