"""What every measurement shares: the workload (HH pairs, lengths, micro-batch), peak memory, medians, JSON out.

Each measurement module runs in its own process (launched by run.py), so its peak resident memory (VmHWM)
belongs to that measurement alone. A module reads its settings as command-line flags and prints one JSON
object as its last stdout line.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
HH_FILE = Path(os.environ.get("MALLOWS_RAY_HH_FILE")
               or REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test-1800.jsonl.gz")


@dataclass(frozen=True)
class Workload:
    """The side-by-side settings: both frameworks see the same pairs, lengths and micro-batch."""

    pairs: int = 8               # HH pairs in the timed pool (steps cycle through them)
    micro_batch: int = 2         # prompts per step (each with chosen + rejected: 4 sequences)
    max_prompt_length: int = 64
    max_response_length: int = 64
    warmup_steps: int = 1
    measured_steps: int = 4
    threads: int = 2             # torch intra-op threads (this machine has 2 cores)

    @property
    def max_length(self) -> int:
        return self.max_prompt_length + self.max_response_length


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    for key, value in asdict(Workload()).items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)


def workload_from_args(args: argparse.Namespace) -> Workload:
    return Workload(**{key: getattr(args, key) for key in asdict(Workload())})


def workload_flags(workload: Workload) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in asdict(workload).items()]


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """`--device` and `--dtype` of a measurement: fp32 on the CPU (the tables), bf16 on a GPU (gpu_check.py)."""
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")


def add_allocator_arg(parser: argparse.ArgumentParser, default: str) -> None:
    """`--allocator`: glibc's defaults (how a plain script runs) or the settings mallows_ray gives its Ray workers
    (`runtime.ALLOCATOR_ENV`: one arena that keeps freed memory)."""
    parser.add_argument("--allocator", choices=["glibc", "workers"], default=default,
                        help="malloc settings: glibc's defaults, or those of mallows_ray's Ray workers")


def apply_allocator(allocator: str, module: str) -> None:
    """Run this measurement under `allocator`. glibc reads its settings at process start, so a process whose
    environment does not match re-executes itself (`python -m <module> <same flags>`) with it set."""
    from mallows_ray.runtime import ALLOCATOR_ENV

    env = ({**os.environ, **ALLOCATOR_ENV} if allocator == "workers"
           else {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV})
    if env != dict(os.environ):
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


def synchronize(device: str) -> None:
    """Wait for the device's queued kernels, so a wall-clock interval covers the work it times."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def peak_gpu_mib() -> float | None:
    """The process's peak allocated GPU memory (MiB); None where no GPU was used."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else None


def achieved_flops(result: dict[str, Any], tokens_key: str) -> float:
    """A step measurement's achieved FLOP/s: (6 + 2 x reference forwards per step) x parameters x tokens/s
    (forward + backward of the policy, a forward of the reference), on the tokens `tokens_key` counts."""
    return (6 + 2 * result["reference_forwards_per_step"]) * result["parameters"] * result[tokens_key]


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def model_path() -> Path:
    from mallows_ray.config import EMBEDDED_MODEL
    from mallows_ray.models import resolve_model_path

    return resolve_model_path(EMBEDDED_MODEL)


def step_rows(rows: list[dict[str, Any]], step: int, micro_batch: int) -> list[dict[str, Any]]:
    """The micro-batch of step `step` (0 = the first warm-up step): `rows` cycled in order, `micro_batch` at a
    time, as TRL's sequential sampler feeds them."""
    start = (step * micro_batch) % len(rows)
    return (rows + rows)[start:start + micro_batch]


def untruncated_pairs(tokenizer, workload: Workload, n: int | None = None) -> list[dict[str, Any]]:
    """The first `n` HH pairs (normalised + tokenized by mallows_ray) that fit the limits without truncation.

    Skipping truncated rows keeps the two frameworks' workloads identical: TRL truncates a whole sequence
    keep-start at max_length, mallows_ray the prompt keep-end and the response keep-start, which would
    otherwise feed them different tokens.
    """
    from mallows_ray.data.normalise import read_normalised
    from mallows_ray.data.tokenize import LengthLimits, tokenize_record

    want = workload.pairs if n is None else n
    limits = LengthLimits(workload.max_prompt_length, workload.max_response_length)
    records, _ = read_normalised(str(HH_FILE), fmt="hh")
    chosen = []
    for record in records:
        row = tokenize_record(tokenizer, record, limits)
        if row["reject_reason"] or row["prompt_truncated"] or any(row["response_truncated"]):
            continue
        chosen.append(row)
        if len(chosen) == want:
            return chosen
    raise ValueError(f"{HH_FILE} has only {len(chosen)} pairs within {limits}; asked for {want}")


def write_raw_pairs(rows: list[dict[str, Any]], path: Path) -> Path:
    """The raw HH lines of `rows` (their `row` field is the line number in HH_FILE) as a JSONL file at `path`."""
    wanted = {row["row"] for row in rows}
    with gzip.open(HH_FILE, "rt") as src, path.open("w") as dst:
        for number, line in enumerate(src, start=1):
            if number in wanted:
                dst.write(line)
    kept = sum(1 for _ in path.open())
    if kept != len(rows):
        raise RuntimeError(f"{path}: wrote {kept} lines for {len(rows)} pairs; HH_FILE row numbers are not "
                           "1-based line numbers as assumed")
    return path


def trl_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Conversational prompt/chosen/rejected rows, the form TRL's DPOTrainer tokenizes with the chat template."""
    return [{"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": row["responses"][0]}],
             "rejected": [{"role": "assistant", "content": row["responses"][1]}]} for row in rows]


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM line (not Linux?)")


def current_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmRSS line (not Linux?)")


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def emit(result: dict[str, Any]) -> None:
    """The measurement's result: the last line of stdout, read by run.py."""
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


def quiet_libraries() -> None:
    """No progress bars, no telemetry, no tokenizer fork warnings in the measured processes."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
