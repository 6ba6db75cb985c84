"""What a local Ray instance and every Ray worker of a mallows_ray job start with (runtime.ensure_ray, which the
`ray_local` fixture and every command go through)."""

import os

import pytest
import ray

from mallows_ray.runtime import WORKER_ENV, wants_dashboard


@ray.remote
def _start_environment() -> dict[str, str]:
    """The worker process's environment as it was at exec: what glibc's malloc read when it started."""
    with open("/proc/self/environ") as fh:
        return dict(item.split("=", 1) for item in fh.read().split("\0") if "=" in item)


@ray.remote(num_gpus=0)
def _visible_gpus() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_workers_start_with_the_allocator_and_device_settings(ray_local):
    expected = {key: os.environ.get(key, value) for key, value in WORKER_ENV.items()}  # a user's value wins
    started = ray.get(_start_environment.remote())
    assert {key: started.get(key) for key in WORKER_ENV} == expected


def test_a_task_that_reserved_no_gpu_sees_none(ray_local):
    """Ray >= 2.49 leaves CUDA_VISIBLE_DEVICES alone for a task with no GPU (it would see them all); the job's
    workers restore the older rule, so a zero-GPU scoring actor or CPU training worker cannot take a GPU."""
    assert ray.get(_visible_gpus.remote()) == ""


def test_a_local_instance_starts_without_the_dashboard(ray_local):
    # the fixture starts Ray through ensure_ray without naming include_dashboard: the default decides
    if wants_dashboard():
        pytest.skip("$MALLOWS_RAY_DASHBOARD asks for the dashboard")
    assert ray._private.worker.global_worker.node.address_info["webui_url"] in ("", None)


def test_training_asking_for_more_than_a_local_instance_has_is_refused_before_prepare(ray_local, tmp_path):
    """The worker group could never start; the run says so before it prepares anything (data.train need not
    even exist yet). 5 workers x 1 CPU on the fixture's 4 logical CPUs; a GPU on a machine with none."""
    from mallows_ray.config import load_config
    from mallows_ray.drivers.train import run_training

    base = [f"data.train={tmp_path / 'absent.jsonl'}", f"data.cache_dir={tmp_path / 'cache'}"]
    with pytest.raises(ValueError, match=r"scaling\.num_workers=5 x cpus_per_worker=1 ask for 5 CPU; this "
                                         r"machine's Ray instance has 4 CPU"):
        run_training(load_config(None, [*base, "scaling.num_workers=5", "scaling.cpus_per_worker=1"]))
    with pytest.raises(ValueError, match=r"gpus_per_worker=1 ask for 1 GPU; this machine's Ray instance has 0 GPU"):
        run_training(load_config(None, [*base, "scaling.use_gpu=true"]))
    assert not (tmp_path / "cache").exists()
