"""Every GPU path once, on one GPU, in a few minutes (issue 20); `benchmarks/gpu_check.sh` runs it.

    bash benchmarks/gpu_check.sh             # a GPU machine with this repository and a CUDA build of torch
    bash benchmarks/gpu_check.sh --dry-run   # the same paths on the CPU in bf16, tiny sizes: the script and
                                             # the bf16 code paths are tested, the figures mean nothing

What runs (each in its own process, as benchmarks/run.py does, so peak memory is its own):
  peak        the GPU's dense bf16 matmul rate (8192^3; the denominator of "fraction of peak")
  attention   tests/unit/test_varlen_attention.py: on the GPU its last test runs torch's varlen flash kernel
              through a tiny model against the grouped sdpa path (log-probs and gradients, bf16 tolerance)
  step        the SmolLM2 training step in bf16 (`benchmarks.step_mallows`): shared prompt, then packed
              (`model.pack`: the varlen flash kernel, `attention.VARLEN`), then packed with grouped sdpa under
              masks (the path before the kernel, and the CPU's); tokens/s, peak GPU memory, achieved FLOP/s /
              peak on the tokens the model ran
  trl         TRL's DPOTrainer on the same pairs, lengths and micro-batch, bf16 on the same GPU: default and
              precompute_ref_log_probs (`benchmarks.step_trl`)
              Both step rows load the model in bf16, so weights and AdamW moments are bf16 on both sides (at
              lr 1e-6 most updates round away): a like-for-like speed comparison, but their peak GPU memory is
              below a real run's, whose DeepSpeed optimizer keeps fp32 master weights and moments (the Ray runs)
  ray         `mallows-ray train` on 1 GPU (Ray Train + DeepSpeed), a few steps each: ZeRO-2 bf16 packed, whose
              prepare runs the scoring actor on the GPU (data.scoring.num_gpus_per_actor=1); ZeRO-3 bf16 with a
              token budget per micro-batch (`batch.max_tokens`); LoRA
The last stdout line of every measurement is JSON; the table at the end puts them side by side.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    HH_FILE,
    Workload,
    achieved_flops,
    model_path,
    untruncated_pairs,
    write_raw_pairs,
)

STEPS = {"warmup": 2, "measured": 6}  # per step measurement on the GPU
DRY_STEPS = {"warmup": 1, "measured": 1}


def run(name: str, argv: list[str], timeout: int, *, json_result: bool = True) -> dict[str, Any] | None:
    """One path in its own process: its last JSON line (`json_result`; else {}) with the wall `seconds`, or
    None when it failed or timed out (what it printed is shown)."""
    print(f"[gpu_check] {name}: {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"[gpu_check] {name}: TIMED OUT after {timeout} s", flush=True)
        return None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or (json_result and not lines):
        print(f"[gpu_check] {name}: FAILED (exit {proc.returncode})\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}",
              flush=True)
        return None
    result = {**(json.loads(lines[-1]) if json_result else {}), "seconds": time.perf_counter() - start}
    print(f"[gpu_check] {name}: ok in {result['seconds']:.0f} s", flush=True)
    return result


def train_overrides(data: Path, work: Path, dry: bool) -> list[str]:
    """The `mallows-ray train` settings every Ray path shares: a few steps on the pairs in `data`."""
    gpu = [] if dry else ["scaling.use_gpu=true", "scaling.gpus_per_worker=1"]
    return [f"data.train={data}", "data.format=hh", f"data.cache_dir={work / 'cache'}",
            "data.max_prompt_length=128", "data.max_response_length=128",
            "loss.name=dpo", "loss.beta=0.1", "optim.lr=1e-6", f"optim.max_steps={2 if dry else 8}",
            "batch.micro_batch_size=2", "batch.gradient_accumulation=1", "scaling.num_workers=1",
            f"run.storage_path={work / 'runs'}", "run.checkpoint_every=0", "export.enabled=false",
            "model.dtype=bfloat16", *gpu]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny sizes: the paths run in bf16 as on the GPU, no figures")
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    dry = args.dry_run
    if not HH_FILE.exists():
        raise SystemExit(f"{HH_FILE} not found: the checks run on the shared HH pairs (set MALLOWS_RAY_HH_FILE to "
                         "their path)")
    py = sys.executable
    device = ["--device=cpu" if dry else "--device=cuda", "--dtype=bfloat16"]
    steps = DRY_STEPS if dry else STEPS
    workload = [f"--pairs={4 if dry else 16}", "--micro-batch=2", "--max-prompt-length=128",
                "--max-response-length=128", f"--warmup-steps={steps['warmup']}",
                f"--measured-steps={steps['measured']}"]
    results: dict[str, dict[str, Any] | None] = {}
    results["peak"] = run("peak", [py, "-m", "benchmarks.matmul_peak", *device,
                                   f"--size={512 if dry else 8192}", f"--repeats={2 if dry else 20}"], 300)
    results["attention"] = run("attention", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                             "tests/unit/test_varlen_attention.py"], 300, json_result=False)
    results["step_shared"] = run("step_shared", [py, "-m", "benchmarks.step_mallows", *device, *workload], 600)
    results["step_packed"] = run("step_packed", [py, "-m", "benchmarks.step_mallows", *device, *workload,
                                                 "--pack=1"], 600)
    results["step_packed_grouped"] = run("step_packed_grouped", [py, "-m", "benchmarks.step_mallows", *device,
                                                                 *workload, "--pack=1", "--attention=grouped"], 600)
    results["trl_default"] = run("trl_default", [py, "-m", "benchmarks.step_trl", *device, *workload], 600)
    results["trl_precompute"] = run("trl_precompute", [py, "-m", "benchmarks.step_trl", *device, *workload,
                                                       "--precompute"], 600)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        from mallows_ray.models import load_tokenizer

        pairs = untruncated_pairs(load_tokenizer(model_path()),
                                  Workload(pairs=8 if dry else 64, max_prompt_length=128, max_response_length=128))
        data = write_raw_pairs(pairs, work / "pairs.jsonl")
        cli = [py, "-m", "mallows_ray.cli", "train", *train_overrides(data, work, dry)]
        scoring_gpu = [] if dry else ["data.scoring.num_gpus_per_actor=1"]
        for name, extra in [("ray_zero2_packed", ["deepspeed.zero_stage=2", "model.pack=true", *scoring_gpu]),
                            ("ray_zero3", ["deepspeed.zero_stage=3", "batch.max_tokens=384"]),
                            ("ray_lora", ["deepspeed.zero_stage=2", "model.lora.rank=16"])]:
            results[name] = run(name, [*cli, *extra, f"run.name={name}"], 900, json_result=False)
    print(render(results, dry))
    if args.output:
        args.output.write_text(json.dumps(results, indent=1))
    if any(r is None for r in results.values()):
        raise SystemExit("[gpu_check] some paths failed (above)")


def render(results: dict[str, dict[str, Any] | None], dry: bool) -> str:
    """The side-by-side table: tokens/s, peak GPU memory, achieved fraction of the matmul peak."""
    peak = (results.get("peak") or {}).get("peak_flops")
    lines = ["", f"gpu_check ({'CPU dry run: the figures mean nothing' if dry else 'GPU'})", "",
             "| path | tokens/s | step s | peak GPU MiB (pure bf16) | achieved / peak |", "|---|---|---|---|---|"]
    # mallows_ray: FLOPs on the tokens the model ran; TRL: on its batches' tokens (as RESULTS.md row 2)
    for name, tokens in (("step_shared", "median_model_tokens_per_s"), ("step_packed", "median_model_tokens_per_s"),
                         ("step_packed_grouped", "median_model_tokens_per_s"), ("trl_default", "median_tokens_per_s"),
                         ("trl_precompute", "median_tokens_per_s")):
        r = results.get(name)
        if r is None:
            lines.append(f"| {name} | FAILED | | | |")
            continue
        fraction = f"{achieved_flops(r, tokens) / peak:.2f}" if peak else "-"
        memory = f"{r['peak_gpu_mib']:.0f}" if r.get("peak_gpu_mib") is not None else "-"
        label = f"{name} (varlen kernel)" if r.get("varlen_attention") else name
        lines.append(f"| {label} | {r['median_tokens_per_s']:.0f} | {r['median_step_s']:.3f} | {memory} | {fraction} |")
    if peak:
        lines.append(f"\nmatmul peak: {peak / 1e12:.1f} TFLOP/s")
    for name in ("attention", "ray_zero2_packed", "ray_zero3", "ray_lora"):
        r = results.get(name)
        lines.append(f"- {name}: " + (f"ok ({r['seconds']:.0f} s)" if r else "FAILED"))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
