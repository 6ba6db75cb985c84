"""The one command: run every measurement side by side on this machine and regenerate benchmarks/RESULTS.md.

    python benchmarks/run.py            # full sizes (tens of minutes on 2 loaded cores)
    python benchmarks/run.py --quick    # few pairs and steps: checks the harness end to end

Each measurement is its own process (`python -m benchmarks.<module> ...`, listed in RESULTS.md), so its peak
resident memory is its own; each prints one JSON line, which this driver turns into the table. Step figures
are medians over the measured steps after warm-up steps; the matmul peak is the best of its repeats.

The mallows_ray step runs as it trains by default: shared prompt, packed (`--pack=1`, model.pack) and under the
malloc settings mallows_ray gives its Ray workers (`step_mallows`'s `--allocator` defaults to `workers`:
`mallows_ray.runtime.ALLOCATOR_ENV`); `mallows_step_unpacked` (`--pack=0`) and `mallows_step_per_response`
(`--share-prompt=0 --pack=0`) take each optimisation away in turn; `mallows_step_compiled` (`--compile=1`) adds
model.compile, which is off by default. TRL runs as users run it, under glibc's
default malloc (`step_trl`'s `--allocator` defaults to `glibc`), and once more in its default mode under the
workers' settings (`trl_default_workers_allocator`, `--allocator=workers`) to show how much of the speed-up
is the allocator.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # `python benchmarks/run.py` from anywhere: make `benchmarks` importable

from benchmarks.common import REPO, Workload, workload_flags  # noqa: E402
from benchmarks.report import Measurements, render  # noqa: E402
from benchmarks.sections import get_section, replace_section, section_names  # noqa: E402

# the names of `measurement_plan`'s measurements (what `--skip` accepts)
MEASUREMENTS = ("matmul", "step_matmuls", "mallows_step", "mallows_step_unpacked", "mallows_step_per_response",
                "mallows_step_compiled", "trl_default", "trl_precompute", "trl_default_workers_allocator",
                "scoring_loop", "chunked", "naive", "pool", "e2e_mallows", "e2e_trl")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: 2 step pairs, 2 measured steps, 4 scoring pairs, 4 end-to-end pairs")
    parser.add_argument("--pairs", type=int, default=None,
                        help="HH pairs of row 4 (prepare + one epoch), default 32, quick 4. The issue asks for 512: "
                        "the HH file has 362 pairs within 64/64 tokens, 893 within 128/128, so use --pairs 512 "
                        "--max-prompt-length 128 --max-response-length 128 on a machine with spare cores")
    parser.add_argument("--step-pairs", type=int, default=None, help="pairs the step rows cycle through (8, quick 2)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="unmeasured steps first (1)")
    parser.add_argument("--measured-steps", type=int, default=None, help="steps the medians are over (4, quick 2)")
    parser.add_argument("--scoring-pairs", type=int, default=None, help="pairs of the row 3 scoring runs (16, quick 4)")
    parser.add_argument("--max-prompt-length", type=int, default=64, help="prompt token limit of every row")
    parser.add_argument("--max-response-length", type=int, default=64, help="response token limit of every row")
    parser.add_argument("--skip", action="append", default=[], metavar="NAME", choices=MEASUREMENTS,
                        help="leave a measurement out (its rows say so): " + ", ".join(MEASUREMENTS))
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--logs", type=Path, default=HERE / "logs",
                        help="stderr of each measurement, and results.json with every raw figure")
    return parser.parse_args()


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from the first line of /proc/stat (steal counts as busy)."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def other_work(seconds: float = 10.0) -> float:
    """Share of the machine's cores busy with other work, sampled over `seconds` while this driver idles.

    The load average cannot tell: it decays over minutes, so right after a measurement it still shows the
    benchmark's own two threads."""
    busy0, total0 = _cpu_jiffies()
    time.sleep(seconds)
    busy1, total1 = _cpu_jiffies()
    return (busy1 - busy0) / max(1, total1 - total0)


def machine() -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kib = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal")))
    versions = {}
    for name in ("torch", "transformers", "trl", "ray", "deepspeed"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # reported, not fatal
            versions[name] = "not installed"
    return {"cpu": cpu, "cores": str(os.cpu_count()), "memory": f"{mem_kib / 2**20:.1f} GiB",
            "os": platform.platform(), "python": platform.python_version(),
            **{f"{k} version": v for k, v in versions.items()}}


def measure(name: str, module: str, flags: list[str], logs: Path) -> tuple[dict | None, str, float]:
    """Run one measurement process; its JSON result (None on failure), its command line, its wall seconds."""
    command = [sys.executable, "-m", f"benchmarks.{module}", *flags]
    shown = "python -m " + " ".join(shlex.quote(part) for part in command[2:])
    logs.mkdir(parents=True, exist_ok=True)
    print(f"[bench] {name}: {shown}", flush=True)
    start = time.perf_counter()
    with (logs / f"{name}.log").open("w") as log:
        proc = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"[bench] {name} FAILED (exit {proc.returncode}); see {logs / (name + '.log')}", flush=True)
        return None, shown, wall
    result = json.loads(lines[-1])
    print(f"[bench] {name}: {wall:.0f} s: " + json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}),
          flush=True)
    return result, shown, wall


def measurement_plan(workload: Workload, e2e: Workload, scoring_pairs: int,
                     quick: bool) -> dict[str, tuple[str, list[str]]]:
    """Each measurement's module under `benchmarks` and its flags, in the order they run."""
    lengths = [f"--max-prompt-length={workload.max_prompt_length}",
               f"--max-response-length={workload.max_response_length}"]
    return {  # the Ray runs first: the longest, and the ones that depend on the most machinery
        "pool": ("pipeline_runs", ["pool", f"--pairs={scoring_pairs}", *lengths]),
        "e2e_mallows": ("pipeline_runs", ["train", f"--pairs={e2e.pairs}", f"--micro-batch={e2e.micro_batch}",
                                          f"--threads={e2e.threads}", *lengths]),
        "e2e_trl": ("step_trl", [*workload_flags(e2e), "--epoch"]),
        "matmul": ("matmul_peak", [f"--threads={workload.threads}", f"--repeats={5 if quick else 20}"]),
        # row 2's upper bound: the default step's matmuls alone, at its shapes
        "step_matmuls": ("step_matmuls", workload_flags(workload)),
        # the default configuration: shared prompt, packed (model.pack), the workers' allocator settings
        "mallows_step": ("step_mallows", [*workload_flags(workload), "--pack=1"]),
        "mallows_step_unpacked": ("step_mallows", [*workload_flags(workload), "--pack=0"]),
        "mallows_step_per_response": ("step_mallows", [*workload_flags(workload), "--share-prompt=0", "--pack=0"]),
        "mallows_step_compiled": ("step_mallows", [*workload_flags(workload), "--pack=1", "--compile=1"]),
        # TRL as users run it (glibc's default malloc), and its default mode under the workers' settings
        "trl_default": ("step_trl", workload_flags(workload)),
        "trl_precompute": ("step_trl", [*workload_flags(workload), "--precompute"]),
        "trl_default_workers_allocator": ("step_trl", [*workload_flags(workload), "--allocator=workers"]),
        "scoring_loop": ("scoring", ["loop", f"--pairs={scoring_pairs}", f"--repeats={1 if quick else 3}", *lengths]),
        "chunked": ("scoring", ["chunked", f"--pairs={scoring_pairs}", *lengths]),
        "naive": ("scoring", ["naive", f"--pairs={scoring_pairs}", *lengths]),
    }


def main() -> None:
    args = parse_args()
    quick = args.quick
    workload = Workload(
        pairs=args.step_pairs or (2 if quick else 8),
        warmup_steps=args.warmup_steps or 1,
        measured_steps=args.measured_steps or (2 if quick else 4),
        max_prompt_length=args.max_prompt_length, max_response_length=args.max_response_length,
    )
    if workload.warmup_steps < 1:
        raise SystemExit("--warmup-steps must be >= 1: TRL's step time is the interval after a previous step")
    e2e = replace(workload, pairs=args.pairs or (4 if quick else 32))
    scoring_pairs = args.scoring_pairs or (4 if quick else 16)
    plan = measurement_plan(workload, e2e, scoring_pairs, quick)
    found = Measurements(machine=machine(), load_before=load_average(), busy_before=other_work(),
                         workload=workload, e2e_pairs=e2e.pairs,
                         scoring_pairs=scoring_pairs, quick=quick,
                         invocation="python benchmarks/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    started = time.perf_counter()
    for name, (module, flags) in plan.items():
        if name in args.skip:
            continue
        found.results[name], found.commands[name], found.walls[name] = measure(name, module, flags, args.logs)
    found.load_after = load_average()
    found.busy_after = other_work()
    found.total_seconds = time.perf_counter() - started
    text = render(found)
    previous = args.output.read_text() if args.output.exists() else ""
    for other in section_names(previous):  # the sections results.py and scale.py wrote (or renamed ones) stay
        kept = get_section(previous, other)
        text = replace_section(text, other, kept) if kept is not None else text
    args.output.write_text(text)
    (args.logs / "results.json").write_text(json.dumps(found.results, indent=1))
    print(f"[bench] wrote {args.output} ({found.total_seconds:.0f} s)")


if __name__ == "__main__":
    main()
