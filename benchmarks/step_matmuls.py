"""Row 2's ceiling: the share of the matmul peak the default step would reach if it were its matmuls alone.

A training step of a decoder-only model is, in flops, its linear layers' matrix products: per linear layer
(weight [out, in]) on the T tokens the model runs, the forward x @ W^T ([T, in] x [in, out]), the input gradient
g @ W ([T, out] x [out, in]) and the weight gradient g^T @ x ([out, T] x [T, in]); the output embedding the same
on the M response tokens only (the chunked head). Here each of those products is timed alone at the default
step's shapes (the same micro-batches as `step_mallows --pack=1`: shared prompt, packed, so T and M are that
step's), best of `--repeats` like the peak, and the step's work as row 2 counts it (6 x parameters x T) is
divided by their summed time. Attention's own products (inside sdpa), the elementwise ops, the grad norm and
AdamW take no time here, and each weight is reused across repeats (warm in cache), so this is an upper bound on
row 2: where it sits below row 2's target, matmuls at these shapes cannot reach it on this machine.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import (
    add_allocator_arg,
    add_workload_args,
    apply_allocator,
    emit,
    median,
    model_path,
    set_threads,
    step_rows,
    untruncated_pairs,
    workload_from_args,
)


def linear_shapes(model) -> dict[tuple[int, int], int]:
    """(out, in) of every linear layer of the transformer body -> how many layers have it."""
    import torch

    counts: dict[tuple[int, int], int] = {}
    for module in getattr(model, model.base_model_prefix).modules():
        if isinstance(module, torch.nn.Linear):
            counts[tuple(module.weight.shape)] = counts.get(tuple(module.weight.shape), 0) + 1
    return counts


def best_seconds(a, b, repeats: int) -> float:
    """The least time of `repeats` products a @ b (after one warm-up product)."""
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return min(times)


def product_seconds(out_features: int, in_features: int, tokens: int, repeats: int) -> float:
    """Forward, input-gradient and weight-gradient products of one linear layer [out, in] on `tokens` rows."""
    import torch

    weight, x, grad = torch.randn(out_features, in_features), torch.randn(tokens, in_features), torch.randn(
        tokens, out_features)
    return (best_seconds(x, weight.T, repeats) + best_seconds(grad, weight, repeats)
            + best_seconds(grad.T, x, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_workload_args(parser)
    parser.add_argument("--repeats", type=int, default=5)
    add_allocator_arg(parser, "workers")
    args = parser.parse_args()
    apply_allocator(args.allocator, "benchmarks.step_matmuls")
    workload = workload_from_args(args)
    set_threads(workload.threads)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from mallows_ray.data.collate import pack_responses
    from mallows_ray.losses.logprobs import IGNORE_INDEX
    from mallows_ray.models import load_tokenizer

    path = model_path()
    tokenizer = load_tokenizer(path)
    rows = untruncated_pairs(tokenizer, workload)
    with torch.device("meta"):  # shapes and the parameter count only, no weights
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    parameters = sum(p.numel() for p in model.parameters())
    vocab, hidden = model.get_output_embeddings().weight.shape
    shapes = linear_shapes(model)
    rates, step_tokens, step_seconds = [], [], []
    for step in range(workload.warmup_steps, workload.warmup_steps + workload.measured_steps):
        batch_rows = step_rows(rows, step, workload.micro_batch)   # step_mallows's measured steps' micro-batches
        packed = pack_responses([r["prompt_ids"] for r in batch_rows], [r["response_ids"] for r in batch_rows],
                                tokenizer.pad_token_id, share_prompt=True, pack=True)
        tokens = packed.model_tokens
        responses = int((packed.model_inputs()["labels"] != IGNORE_INDEX).sum())
        seconds = sum(count * product_seconds(out_f, in_f, tokens, args.repeats)
                      for (out_f, in_f), count in shapes.items())
        seconds += product_seconds(vocab, hidden, responses, args.repeats)   # the head on response tokens only
        rates.append(6 * parameters * tokens / seconds)
        step_tokens.append(tokens)
        step_seconds.append(seconds)
    emit({"threads": workload.threads, "parameters": parameters, "step_model_tokens": step_tokens,
          "step_matmul_seconds": step_seconds, "median_flops": median(rates)})


if __name__ == "__main__":
    main()
