"""Row 3, single-process scoring: a plain loop of `response_stats`, entropy on/off, chunked vs naive memory.

Modes (one per process, so peak memory belongs to one path):
  loop     tokenize + score the HH pairs one scoring batch at a time, with entropy (what the actor pool
           does per batch, without Ray); then the same batches with and without entropy, interleaved.
  chunked  peak memory of one scoring forward through the chunked log-prob path (response_stats).
  naive    peak memory of the same forward with full-vocabulary logits and log_softmax over [R, T, V].
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import (
    Workload,
    current_rss_mib,
    emit,
    median,
    model_path,
    peak_rss_mib,
    quiet_libraries,
    set_threads,
    untruncated_pairs,
)


def _batches(rows, size):
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["loop", "chunked", "naive"])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per scoring batch (ScoringConfig)")
    parser.add_argument("--repeats", type=int, default=3, help="entropy on/off passes over the batches")
    parser.add_argument("--max-prompt-length", type=int, default=64)
    parser.add_argument("--max-response-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    quiet_libraries()
    set_threads(args.threads)

    import torch

    from mallows_ray.config import ModelConfig
    from mallows_ray.data.collate import pack_responses
    from mallows_ray.data.tokenize import LengthLimits, tokenize_record
    from mallows_ray.models import load_model, load_tokenizer, response_stats

    path = model_path()
    tokenizer = load_tokenizer(path)
    model = load_model(path, torch.float32).eval()
    pad = tokenizer.pad_token_id
    workload = Workload(pairs=args.pairs, max_prompt_length=args.max_prompt_length,
                        max_response_length=args.max_response_length)

    def packed_of(rows, share_prompt=ModelConfig().share_prompt):  # the loop packs as prepare does by default
        return pack_responses([r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows], pad,
                              share_prompt=share_prompt)

    if args.mode == "loop":
        limits = LengthLimits(args.max_prompt_length, args.max_response_length)
        records = untruncated_pairs(tokenizer, workload)  # the pairs the pool run scores
        start = time.perf_counter()
        with torch.no_grad():  # the pool's work per batch: tokenize, pack, score with entropy
            for chunk in _batches(records, args.batch_size):
                packed = packed_of([tokenize_record(tokenizer, record, limits) for record in chunk])
                response_stats(model, **packed.model_inputs(), with_entropy=True)
        loop_seconds = time.perf_counter() - start
        batches = [packed_of(b) for b in _batches(records, args.batch_size)]
        timings = {True: [], False: []}
        with torch.no_grad():
            for _ in range(args.repeats + 1):  # first pass is warm-up
                for with_entropy in (True, False):
                    t0 = time.perf_counter()
                    for p in batches:
                        response_stats(model, **p.model_inputs(), with_entropy=with_entropy)
                    timings[with_entropy].append(time.perf_counter() - t0)
        tokens = sum(int(p.attention_mask.sum()) for p in batches)
        emit({"mode": "loop", "rows": len(records), "loop_seconds": loop_seconds,
              "rows_per_second": len(records) / loop_seconds,
              "entropy_seconds": median(timings[True][1:]), "logprob_seconds": median(timings[False][1:]),
              "scored_tokens": tokens, "peak_rss_mib": peak_rss_mib()})
        return

    # memory modes: one scoring batch of the longest pairs, so the [R, T, V] tensor is as large as it gets here
    rows = sorted(untruncated_pairs(tokenizer, workload), key=lambda r: -len(r["prompt_ids"]) - max(
        len(x) for x in r["response_ids"]))[:args.batch_size]
    packed = packed_of(rows, share_prompt=False)  # the naive path needs plain rows; compare like with like
    baseline = current_rss_mib()  # NB: the weights are memory-mapped; pages first touched below count in both modes
    with torch.no_grad():
        if args.mode == "chunked":
            stats = response_stats(model, **packed.model_inputs(), with_entropy=True)
            logps = stats.logp_sum
        else:
            logits = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits  # [R, T, V]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            mask = packed.labels != -100
            token = logprobs.gather(-1, packed.labels.clamp(min=0)[..., None])[..., 0]
            -(logprobs.exp() * logprobs).sum(-1)  # the entropy the scorer also computes (value unused here)
            logps = (token * mask).sum(-1)
    emit({"mode": args.mode, "R": int(packed.input_ids.shape[0]), "T": int(packed.input_ids.shape[1]),
          "V": int(model.get_output_embeddings().weight.shape[0]), "rss_before_mib": baseline,
          "peak_rss_mib": peak_rss_mib(), "increment_mib": peak_rss_mib() - baseline,
          "logp_sum_first": float(logps[0])})


if __name__ == "__main__":
    main()
