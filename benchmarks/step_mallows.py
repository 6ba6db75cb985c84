"""Row 1-2, mallows_ray side: the training step the Ray workers run, in one process without Ray or DeepSpeed.

One step = collate a micro-batch of scored rows, `forward_loss` through `PolicyLogprobs` (transformer body +
chunked log-prob head), backward, grad-norm clipping at 1.0 (DeepSpeed's gradient_clipping), AdamW step.
Reference log-probs are a column of the scored data, so here they are computed once beforehand with the
same forward under no_grad, outside the timed region.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import (add_workload_args, emit, median, model_path, peak_rss_mib, quiet_libraries,
                               set_threads, untruncated_pairs, workload_from_args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_workload_args(parser)
    workload = workload_from_args(parser.parse_args())
    quiet_libraries()
    set_threads(workload.threads)

    import torch

    from mallows_ray.data.collate import pack_responses
    from mallows_ray.losses import build_loss
    from mallows_ray.models import load_model, load_tokenizer, response_stats
    from mallows_ray.train.batches import collate
    from mallows_ray.train.engine import PolicyLogprobs
    from mallows_ray.train.objective import forward_loss

    path = model_path()
    tokenizer = load_tokenizer(path)
    rows = untruncated_pairs(tokenizer, workload)
    lm = load_model(path, torch.float32)
    lm.config.use_cache = False
    with torch.no_grad():  # the scored data's ref_logps column, as prepare would write it
        for row in rows:
            packed = pack_responses([row["prompt_ids"]], [row["response_ids"]], tokenizer.pad_token_id)
            stats = response_stats(lm, packed.input_ids, packed.attention_mask, packed.labels, with_entropy=False)
            row.update(ref_logps=stats.logp_sum.tolist(), dispersion=1.0)

    policy = PolicyLogprobs(lm, zero_stage=0).train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    loss_fn = build_loss("dpo", beta=0.1)
    n_params = sum(p.numel() for p in policy.parameters())
    mb = workload.micro_batch

    seconds, cpu_seconds, tokens = [], [], []
    for step in range(workload.warmup_steps + workload.measured_steps):
        start_row = (step * mb) % len(rows)
        batch_rows = (rows + rows)[start_row:start_row + mb]
        t0, c0 = time.perf_counter(), time.process_time()
        batch = collate(batch_rows, tokenizer.pad_token_id, with_scores=False)
        loss = forward_loss(policy, batch, loss_fn, listwise=False).losses.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        if step >= workload.warmup_steps:
            seconds.append(elapsed)
            cpu_seconds.append(cpu)
            tokens.append(batch.tokens)
    emit({
        "framework": "mallows_ray", "mode": "reference precomputed",
        "step_seconds": seconds, "step_cpu_seconds": cpu_seconds, "step_tokens": tokens,
        "median_step_s": median(seconds), "tokens_per_s": sum(tokens) / sum(seconds),
        "median_tokens_per_s": median([t / s for t, s in zip(tokens, seconds)]),
        "median_tokens_per_cpu_s": median([t / s for t, s in zip(tokens, cpu_seconds)]),
        "peak_rss_mib": peak_rss_mib(), "parameters": n_params, "reference_forwards_per_step": 0,
    })


if __name__ == "__main__":
    main()
