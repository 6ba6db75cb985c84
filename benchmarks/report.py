"""RESULTS.md from the measurements of one run: machine, commands, the table of ratios against targets.

A missed target states its measured gap and the cause that applies to that row (CAUSES); a row whose
measurement failed or was skipped says so instead of a number.

The measurements (run.py's `measurement_plan`): `mallows_step` is the mallows_ray step as it trains by default
(shared prompt, packed: model.pack; under the malloc settings it gives its Ray workers, runtime.ALLOCATOR_ENV);
`mallows_step_unpacked` the same without packing, `mallows_step_per_response` one row per response, unpacked;
`trl_default` and `trl_precompute` TRL's `DPOTrainer` as users run it (glibc's default malloc), and
`trl_default_workers_allocator` its default mode under the workers' malloc settings (rows 1g, 1g');
`mallows_step_compiled` the default step with model.compile (row 1h: what the switch buys once compiled);
`step_matmuls` the default step's matmuls alone at its shapes (row 2'': row 2's upper bound).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from benchmarks.common import Workload, achieved_flops

# Why a row can miss its target, from what each side computes and from profiles of the step on an idle
# 2-core machine (stage times in benchmarks/README.md). Printed only for rows that miss.
CAUSES = {
    "speed_default": "TRL's default step runs the policy forward+backward plus a reference forward (~8N flops/token "
                     "against our 6N); mallows_ray also runs each prompt once per pair instead of twice (row 1e), "
                     "packs the micro-batch into one row without padding (row 1f), steps a fused AdamW, and runs "
                     "under its Ray workers' malloc settings (one glibc arena that keeps freed memory; rows 1g and "
                     "1g' separate that share). A miss means those margins together fell short of the target on "
                     "this run: rows 1e, 1f and 1g' show which, the other-work line whether load swamped them.",
    "speed_precompute": "with precomputed reference log-probs TRL runs the same body and a full-vocabulary head on "
                        "both sequences of a pair; mallows_ray's lead is the shared prompt (row 1e), the packed "
                        "row without padding (row 1f), the fused optimizer and its Ray workers' malloc settings "
                        "(rows 1g, 1g'). A miss means those margins together fell short of the target on this run "
                        "(the other-work line says whether load swamped them).",
    "memory": "the policy's parameters, gradients and AdamW moments (4 x 0.54 GB fp32 for 135M parameters) plus "
              "the Python/torch runtime and the benchmark's tokenized HH file (~0.45 GB, both sides) are a floor "
              "of ~2.5 GB that fp32 full fine-tuning cannot go below; TRL's default adds one fp32 reference copy "
              "(~0.54 GB) and full-vocabulary logits. The rest of mallows_ray's peak is the backward's live "
              "activations (~1.2 MB per token run at this size) while the gradients fill in.",
    "mfu": "session 31's profile (benchmarks/README.md; a host with a 394 GFLOP/s 2048^3 peak; steady state after "
           "8 steps at 128/128, packed, the workers' allocator settings): forward 31%, backward 57%, grad-norm "
           "clipping 5% (since session 35 ~2%: chunked dot products, the clip inside the fused AdamW), fused "
           "AdamW 6%; aten::mm at ~68% of that peak (its matmuls are "
           "240-470 rows, the micro-batch's tokens, by 576-1536 columns); the rest of the forward and backward is "
           "attention and the elementwise ops of RMSNorm, RoPE, SiLU and the residual adds (the tied embedding's "
           "dense [V, H] gradient, ~3%, is gone since session 36: the lookup adds its rows into the head's). "
           "The chunked head recomputes no logits when a micro-batch's response tokens fit "
           "one chunk (here they do). Counted on the tokens the model really ran, not on the pair sequences' "
           "tokens (row 2'), so the shared prompt does not inflate it. Larger micro-batches run larger, faster "
           "matmuls. model.compile (off by default) fuses the elementwise ops and attention's neighbours in "
           "each decoder layer: its step and its share of the peak are rows 1h and 2 (model.compile), after "
           "the first step's compiling (benchmarks/README.md). Row 2'' times the same step's matmuls alone at its "
           "shapes (benchmarks/step_matmuls.py): the share it would reach with nothing else in the step; the "
           "distance from row 2 to it is the rest of the step's time, not the matmuls.",
    "share_prompt": "the shared prompt runs each prompt once for both of its responses instead of once per "
                    "response (1/3 fewer tokens run at 64/64), at the price of a per-response attention mask over "
                    "the prompt row; a miss means the saved tokens did not pay for that mask at these lengths, or "
                    "the machine's load swamped the margin (see the other-work line).",
    "pack": "packing lays the micro-batch's prompts (each with its responses) end to end in one row, so no "
            "position is padding (~25% of the unpacked positions in this fixed pair order), and runs attention on "
            "each prompt's block of the row only; a miss means the padding saved did not pay for the per-block "
            "attention calls at these lengths, or the machine's load swamped the margin (see the other-work line).",
    "chunked_memory": "the chunked head holds one float32 [chunk, V] block at a time against the naive path's "
                      "[R, T, V] logits, log-softmax and entropy; a miss means something other than the head "
                      "dominated the increment at this batch size (each side's increment is in the raw figures).",
    "entropy": "the entropy term adds one [chunk, V] dot product per chunk (torch.linalg.vecdot) to a forward "
               "whose cost is the transformer body plus the head matmul.",
    "end_to_end": "mallows_ray pays fixed costs TRL does not (timed on 64 pairs, benchmarks/README.md): Ray's "
                  "start (~4 s), the Ray Data read stage (~5 s), the scoring actors' start-up (a process each, "
                  "torch, the model), the Ray Train worker's and DeepSpeed's start-up (~10 s) and the final "
                  "checkpoint (1.6 GB of weights and AdamW moments written and hashed, ~9 s, renamed into the run "
                  "folder since session 36 instead of copied; TRL's run saves nothing), and its "
                  "worker's first ~8 steps run at ~2/3 speed while its heap grows; prepare's reference forward "
                  "over every pair is work TRL's default mode does inside its steps. Its steps then run below "
                  "the in-process step on the same pairs: Ray's own processes wake on the same 2 cores and "
                  "stall the step's OpenMP threads (the dashboard's ten, ~8%, are off since session 34; "
                  "benchmarks/README.md).",
}


@dataclass
class Measurements:
    machine: dict[str, str]
    load_before: str
    busy_before: float  # share of the cores busy with other work in a 10 s sample before the run
    workload: Workload
    e2e_pairs: int
    scoring_pairs: int
    quick: bool
    invocation: str
    results: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    commands: dict[str, str] = field(default_factory=dict)
    walls: dict[str, float] = field(default_factory=dict)
    load_after: str = ""
    busy_after: float = 0.0
    total_seconds: float = 0.0


@dataclass(frozen=True)
class Row:
    item: str
    measured: str
    target: str
    met: bool | None  # None: no target, or not measured
    cause: str = ""


def _get(m: Measurements, name: str, key: str) -> float | None:
    result = m.results.get(name)
    return None if result is None or result.get(key) is None else float(result[key])


def _ratio_row(item: str, num: float | None, den: float | None, target: str, ok: Callable[[float], bool] | None,
               cause: str, detail: Callable[[float, float], str]) -> Row:
    if num is None or den is None or den == 0:
        return Row(item, "not measured (failed or skipped; see logs/)", target, None)
    ratio = num / den
    met = None if ok is None else ok(ratio)
    return Row(item, f"**{ratio:.2f}x** ({detail(num, den)})", target, met, "" if met in (True, None) else cause)


def _first_step_s(m: Measurements, name: str) -> str:
    """The first warm-up step's seconds of a step measurement (with model.compile: the compiling)."""
    warmup = (m.results.get(name) or {}).get("warmup_seconds") or [None]
    return "?" if warmup[0] is None else f"{warmup[0]:.0f} s"


def rows(m: Measurements) -> list[Row]:
    tps = lambda name: _get(m, name, "median_tokens_per_s")  # noqa: E731
    cpu_tps = lambda name: _get(m, name, "median_tokens_per_cpu_s")  # noqa: E731
    rss = lambda name: _get(m, name, "peak_rss_mib")  # noqa: E731
    tok = lambda a, b: f"{a:.0f} vs {b:.0f} tokens/s"  # noqa: E731
    cpu_tok = lambda a, b: f"{a:.0f} vs {b:.0f} tokens/CPU-s"  # noqa: E731
    mib = lambda a, b: f"{a:.0f} vs {b:.0f} MiB"  # noqa: E731
    pays = "(optimisation pays: > 1)"
    out = [
        _ratio_row("1a. step tokens/s, mallows_ray / TRL default", tps("mallows_step"), tps("trl_default"),
                   ">= 3.0x", lambda r: r >= 3.0, CAUSES["speed_default"], tok),
        _ratio_row("1b. step tokens/s, mallows_ray / TRL precompute_ref_log_probs", tps("mallows_step"),
                   tps("trl_precompute"), ">= 2.5x", lambda r: r >= 2.5, CAUSES["speed_precompute"], tok),
        _ratio_row("1a'. tokens per CPU-second (load-robust), mallows_ray / TRL default",
                   cpu_tps("mallows_step"), cpu_tps("trl_default"), "(context)", None, "", cpu_tok),
        _ratio_row("1b'. tokens per CPU-second (load-robust), mallows_ray / TRL precompute",
                   cpu_tps("mallows_step"), cpu_tps("trl_precompute"), "(context)", None, "", cpu_tok),
        _ratio_row("1c. peak RSS, mallows_ray / TRL default", rss("mallows_step"), rss("trl_default"),
                   "<= 0.66x", lambda r: r <= 0.66, CAUSES["memory"], mib),
        _ratio_row("1d. peak RSS, mallows_ray / TRL precompute_ref_log_probs", rss("mallows_step"),
                   rss("trl_precompute"), "(none)", None, "", mib),
        _ratio_row("1e. step tokens/s, mallows_ray shared prompt / one row per response (model.share_prompt; "
                   "both unpacked)", tps("mallows_step_unpacked"), tps("mallows_step_per_response"), pays,
                   lambda r: r > 1.0, CAUSES["share_prompt"], tok),
        _ratio_row("1f. step tokens/s, mallows_ray packed / unpacked (model.pack, the default)", tps("mallows_step"),
                   tps("mallows_step_unpacked"), pays, lambda r: r > 1.0, CAUSES["pack"], tok),
        _ratio_row("1f'. tokens per CPU-second (load-robust), packed / unpacked", cpu_tps("mallows_step"),
                   cpu_tps("mallows_step_unpacked"), "(context)", None, "", cpu_tok),
        _ratio_row("1g. step tokens/s, TRL default under mallows_ray's worker allocator settings / TRL default as "
                   "users run it", tps("trl_default_workers_allocator"), tps("trl_default"), "(context)", None, "",
                   tok),
        _ratio_row("1g'. step tokens/s, mallows_ray / TRL default under the same allocator settings",
                   tps("mallows_step"), tps("trl_default_workers_allocator"), "(context)", None, "", tok),
        _ratio_row("1h. step tokens/s, mallows_ray with model.compile / without (off by default: the compiling is "
                   "in the first, unmeasured step)", tps("mallows_step_compiled"), tps("mallows_step"), "(context)",
                   None, "", lambda a, b: f"{tok(a, b)}; first step {_first_step_s(m, 'mallows_step_compiled')} "
                                          f"against {_first_step_s(m, 'mallows_step')}"),
    ]
    peak = _get(m, "matmul", "peak_flops")
    # (measurement, label, tokens key, target, threshold or None): achieved = (6 + 2 x reference forwards) x
    # parameters x tokens/s
    model_tokens, pair_tokens = "median_model_tokens_per_s", "median_tokens_per_s"
    flop_rows = (("mallows_step", "mallows_ray packed, the default (tokens the model ran)", model_tokens, ">= 0.65",
                  0.65),
                 ("mallows_step_unpacked", "mallows_ray unpacked (tokens the model ran)", model_tokens, "(context)",
                  None),
                 ("mallows_step", "mallows_ray packed (pair-sequence tokens, 2')", pair_tokens, "(context)", None),
                 ("mallows_step_compiled", "mallows_ray packed, model.compile (tokens the model ran)", model_tokens,
                  "(context)", None),
                 ("trl_default", "TRL default", pair_tokens, "(none)", None),
                 ("trl_precompute", "TRL precompute", pair_tokens, "(none)", None),
                 ("trl_default_workers_allocator", "TRL default under the workers' allocator settings", pair_tokens,
                  "(context)", None))
    gflops = lambda a, b: f"{a / 1e9:.1f} of {b / 1e9:.1f} GFLOP/s"  # noqa: E731
    for name, label, key, target, threshold in flop_rows:
        result = m.results.get(name)
        achieved = None
        if result is not None and result.get(key) is not None:
            achieved = achieved_flops(result, key)
        ok = None if threshold is None else (lambda r, t=threshold: r >= t)
        row = _ratio_row(f"2. achieved / fp32 matmul peak, {label}", achieved, peak, target, ok, CAUSES["mfu"],
                         gflops)
        out.append(Row(row.item, row.measured.replace("x**", "**", 1), row.target, row.met, row.cause))
    ceiling = _ratio_row("2''. the default step's linear-layer and head matmuls alone, timed at its shapes (an upper "
                         "bound on row 2: no attention, elementwise ops, grad norm or AdamW) / fp32 matmul peak",
                         _get(m, "step_matmuls", "median_flops"), peak, "(context)", None, "", gflops)
    out.append(Row(ceiling.item, ceiling.measured.replace("x**", "**", 1), ceiling.target, ceiling.met))
    rps = lambda a, b: f"{a:.2f} vs {b:.2f} rows/s"  # noqa: E731
    out.append(_ratio_row(f"3a. reference scoring rows/s at this run's {m.scoring_pairs} pairs, actor pool / plain "
                          "loop (the issue's target, >= 0.9x at >= 2000 rows, is measured by `python -m "
                          "benchmarks.scale`: RESULTS.md's scale section, not this row)",
                          _get(m, "pool", "rows_per_second"), _get(m, "scoring_loop", "rows_per_second"),
                          "(context)", None, "", rps))
    secs = lambda a, b: f"{a:.2f} vs {b:.2f} s"  # noqa: E731
    out.append(_ratio_row("3b. scoring time, with entropy / log-probs only", _get(m, "scoring_loop", "entropy_seconds"),
                          _get(m, "scoring_loop", "logprob_seconds"), "<= 1.10x", lambda r: r <= 1.10,
                          CAUSES["entropy"], secs))
    incr = lambda a, b: f"+{a:.0f} vs +{b:.0f} MiB over the loaded model"  # noqa: E731
    out.append(_ratio_row("3c. scoring forward peak-memory increment, chunked / naive full-vocabulary",
                          _get(m, "chunked", "increment_mib"), _get(m, "naive", "increment_mib"), "< 1.0x",
                          lambda r: r < 1.0, CAUSES["chunked_memory"], incr))
    e2e_trl = _get(m, "e2e_trl", "seconds_in_process")
    out.append(_ratio_row(f"4. prepare + 1 epoch on {m.e2e_pairs} pairs, mallows_ray / TRL default (time)",
                          _get(m, "e2e_mallows", "seconds"), e2e_trl, "<= 0.5x", lambda r: r <= 0.5,
                          CAUSES["end_to_end"], secs))
    return out


def _busy_warning(m: Measurements) -> list[str]:
    """A warning line when other work shared the machine: the measurements run one after another, so they do
    not share the same load, and a multi-threaded torch step on a busy machine loses more than its CPU share
    (a thread waits at each barrier for one that is descheduled)."""
    busiest = max(m.busy_before, m.busy_after)
    if busiest <= 0.10:
        return []
    return [f"- **Not a result: the machine was busy** (other work held {busiest:.0%} of the cores in the "
            "samples around the run). Every figure and ratio below is distorted by it; rerun on an idle machine."]


def render(m: Measurements) -> str:
    w = m.workload
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `{m.invocation}` in one run ({m.total_seconds / 60:.1f} min)"
        + (" in **--quick** mode: tiny sizes, a harness check, not a result." if m.quick else "."),
        "Do not edit by hand: rerun the command.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in m.machine.items()],
        f"- other work on the cores (10 s samples while the driver idles): {m.busy_before:.1%} before the run, "
        f"{m.busy_after:.1%} after; load average (1/5/15 min) before: {m.load_before}, after: {m.load_after} "
        "(the load average still counts the benchmark's own threads for minutes)",
        *_busy_warning(m),
        "",
        "## Workload",
        "",
        f"- SmolLM2-135M-Instruct (embedded), fp32, CPU, {w.threads} torch threads; DPO, beta 0.1, AdamW, "
        "grad-norm clip 1.0",
        f"- HH-RLHF harmless-base test pairs that fit without truncation: max prompt {w.max_prompt_length}, "
        f"max response {w.max_response_length} tokens (TRL: max_length {w.max_length})",
        f"- step rows: micro-batch {w.micro_batch} pairs (= {2 * w.micro_batch} sequences), {w.pairs} pairs cycled "
        f"in the same order by both, {w.warmup_steps} warm-up + {w.measured_steps} measured steps, "
        "medians over the measured steps",
        "- mallows_ray's step as it trains by default: shared prompt, packed (model.pack), under the malloc settings "
        "it gives its Ray workers (one glibc arena that keeps freed memory); TRL as users run it (glibc's default "
        "malloc), and its default mode once more under the workers' settings (rows 1g, 1g')",
        f"- scoring rows: {m.scoring_pairs} pairs, scoring batches of 8 prompts; end to end: {m.e2e_pairs} pairs"
        + ("" if m.e2e_pairs >= 512 else " (fewer than the 512 the issue asks for, to fit the shared machine: "
                                         "see `--pairs` in `python benchmarks/run.py --help`)"),
        "",
        "## Results",
        "",
        "| # | measured | target | met |",
        "|---|---|---|---|",
    ]
    table = rows(m)
    for row in table:
        met = {True: "yes", False: "**no**", None: "-"}[row.met]
        lines.append(f"| {row.item} | {row.measured} | {row.target} | {met} |")
    missed = [row for row in table if row.met is False]
    if missed:
        lines += ["", "## Missed targets: gap and cause", ""]
        for row in missed:
            lines.append(f"- {row.item}: measured {row.measured.replace('**', '')}, target {row.target}. {row.cause}")
    lines += ["", "## Raw figures", "", "| measurement | wall s | result |", "|---|---|---|"]
    for name, result in m.results.items():
        shown = "FAILED" if result is None else ", ".join(
            f"{k}={_short(v)}" for k, v in result.items() if not isinstance(v, list))
        lines.append(f"| {name} | {m.walls.get(name, 0):.0f} | {shown} |")
    lines += ["", "## Commands", "",
              "Each measurement ran in its own process, from the repository root. `step_mallows` runs under the "
              "malloc settings mallows_ray gives its Ray workers (`mallows_ray.runtime.ALLOCATOR_ENV`: one glibc "
              "arena that keeps freed memory) unless `--allocator=glibc`; `step_trl` under glibc's defaults, as "
              "users run it, unless `--allocator=workers`:", ""]
    lines += [f"- {name}: `{command}`" for name, command in m.commands.items()]
    lines += ["", f"Settings: `{asdict(w)}`", ""]
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
