"""Where a run executes: joining or starting Ray, and the compute dtype of a device. Shared by the data
pipeline's driver, the training driver and its workers, so it lives below all of them."""

from __future__ import annotations

import os

import torch

# glibc's malloc returns every block over 32 MiB to the kernel when it is freed (mmap / munmap), and gives each
# thread its own arena, which maps large blocks the same way. A training step frees and reallocates its [V, H]
# gradients and [chunk, V] logit blocks every step, so the kernel faults and zeroes their pages in again each
# time: SmolLM2 on CPU, 131k page faults a step and a quarter of the process's CPU time in the kernel. One
# arena that keeps what it frees: no fault a step once its heap has grown (~8 steps), the step ~1.2x faster
# (benchmarks/README.md). glibc reads these at process start (other C libraries ignore them), so they go to
# Ray's worker processes as environment.
ALLOCATOR_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**36)}
# Since Ray 2.49 (ray-project/ray#54868) a task or actor that reserved no GPU still sees every GPU of its node
# (CUDA_VISIBLE_DEVICES is left as it is), so a scoring actor with data.scoring.num_gpus_per_actor=0 would pick
# GPU 0 without reserving it, and a worker of a scaling.use_gpu=false run would have DeepSpeed move its model to
# a GPU while torch.distributed runs gloo. This restores Ray's older rule: no GPU reserved, none visible.
DEVICE_ENV = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1"}
WORKER_ENV = {**ALLOCATOR_ENV, **DEVICE_ENV}


def worker_env() -> dict[str, str]:
    """The `WORKER_ENV` settings the user has not set (a job's own value wins, and Ray refuses a job whose
    runtime env and the driver's name the same variable)."""
    return {key: value for key, value in WORKER_ENV.items() if key not in os.environ}


# Set to 1 to start a local instance with Ray's dashboard (http://127.0.0.1:8265)
DASHBOARD_ENV = "MALLOWS_RAY_DASHBOARD"

# Whether `ensure_ray` started this process's Ray instance locally (`check_local_resources`)
_started_local = False


def ensure_ray(address: str | None = None, **init_options) -> None:
    """Join `address` / $RAY_ADDRESS (as under `ray job submit`), else start a local instance; either way the
    job's workers start with the allocator and device-visibility settings (`WORKER_ENV`). `init_options` go to
    `ray.init`.

    A local instance starts without Ray's dashboard unless $MALLOWS_RAY_DASHBOARD=1 (`wants_dashboard`): its
    ten processes (the head and nine modules) poll all the time, and on a 2-core machine they took ~8% of a
    training worker's speed (benchmarks/README.md, "Ray's own processes"). A cluster keeps its own dashboard."""
    import ray

    if not ray.is_initialized():
        # "local" explicitly: a stale ray_current_cluster file would make a bare ray.init() join a dead head
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        if address == "local":  # ray.init refuses include_dashboard when it joins a running cluster
            init_options.setdefault("include_dashboard", wants_dashboard())
        ray.init(address=address, runtime_env={"env_vars": worker_env()}, **init_options)
        global _started_local
        _started_local = address == "local"


def check_local_resources(count: tuple[str, int], each: dict[str, tuple[str, float]]) -> None:
    """ValueError when a local Ray instance that `ensure_ray` started has less of a resource than `count` actors
    or workers reserving `each` ask for: no autoscaler adds nodes to it, so they would wait forever. `count`:
    (its setting, n); `each`: {resource: (its setting, amount per actor or worker)}, e.g. {"GPU":
    ("gpus_per_worker", 1.0)}. A joined cluster is not checked (its autoscaler may add nodes)."""
    import ray

    if not (_started_local and ray.is_initialized()):
        return
    have = ray.cluster_resources()
    (count_key, n) = count
    short = {name: (key, amount) for name, (key, amount) in each.items() if n * amount > have.get(name, 0.0)}
    if short:
        asking = " / ".join(f"{key}={amount:g}" for key, amount in short.values())
        wanted = ", ".join(f"{n * amount:g} {name}" for name, (_, amount) in short.items())
        held = ", ".join(f"{have.get(name, 0.0):g} {name}" for name in short)
        raise ValueError(f"{count_key}={n} x {asking} ask for {wanted}; this machine's Ray instance has {held}, and "
                         "a local instance gets no more: lower them (or join a cluster that has them: --address / "
                         "RAY_ADDRESS)")


def wants_dashboard() -> bool:
    """$MALLOWS_RAY_DASHBOARD: 1 starts a local instance with Ray's dashboard, 0 or unset without it."""
    value = os.environ.get(DASHBOARD_ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"${DASHBOARD_ENV}={value!r}: set it to 1 to start the local Ray instance with its "
                         "dashboard, or to 0 (the default) to start it without")
    return value == "1"


def worker_threads(requested: int, workers_on_node: int) -> int:
    """Torch intra-op threads of a training worker: `requested`, or (0) the CPUs this process may run on shared
    among the run's `workers_on_node`, at least 1. Ray's own rule (OMP_NUM_THREADS = the worker's reserved CPUs,
    at least 1) gave the default fractional reservation one thread, leaving a 2-core machine's second core idle
    for the whole of training (prepare's actors are gone by then)."""
    if requested:
        return requested
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, usable // workers_on_node)


def dtype_name(name: str, on_gpu: bool) -> str:
    """model.dtype `name` with `auto` resolved: bf16 on a GPU, fp32 on CPU. On a CPU without AMX bf16 matmuls
    are slow; with it (this Xeon) they run 5x faster than fp32, yet a Ray worker's bf16 step was no faster than
    its fp32 one on SmolLM2 (benchmarks/README.md, bf16 on the CPU), and fp32 keeps CPU runs bit-reproducible."""
    if name == "auto":
        return "bfloat16" if on_gpu else "float32"
    return name


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype of model.dtype `name` on `device` (`dtype_name`)."""
    return getattr(torch, dtype_name(name, device.type == "cuda"))
