"""What every Ray worker of a mallows_ray job starts with (runtime.ensure_ray, which the `ray_local` fixture and
every command go through)."""

import os

import ray

from mallows_ray.runtime import ALLOCATOR_ENV


@ray.remote
def _start_environment() -> dict[str, str]:
    """The worker process's environment as it was at exec: what glibc's malloc read when it started."""
    with open("/proc/self/environ") as fh:
        return dict(item.split("=", 1) for item in fh.read().split("\0") if "=" in item)


def test_workers_start_with_the_allocator_settings(ray_local):
    expected = {key: os.environ.get(key, value) for key, value in ALLOCATOR_ENV.items()}  # a user's value wins
    started = ray.get(_start_environment.remote())
    assert {key: started.get(key) for key in ALLOCATOR_ENV} == expected
