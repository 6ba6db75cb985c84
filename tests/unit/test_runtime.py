"""runtime.py without Ray: which allocator and device settings and how many torch threads the workers are given,
and whether a local instance starts with the dashboard."""

import os

import pytest

from mallows_ray.runtime import (
    ALLOCATOR_ENV,
    DASHBOARD_ENV,
    DEVICE_ENV,
    WORKER_ENV,
    wants_dashboard,
    worker_env,
    worker_threads,
)


def test_worker_env_gives_every_setting_the_user_has_not_set(monkeypatch):
    for key in WORKER_ENV:
        monkeypatch.delenv(key, raising=False)
    assert worker_env() == WORKER_ENV == {**ALLOCATOR_ENV, **DEVICE_ENV}
    assert ALLOCATOR_ENV["MALLOC_ARENA_MAX"] == "1" and ALLOCATOR_ENV["MALLOC_MMAP_MAX_"] == "0"
    assert DEVICE_ENV == {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1"}


def test_a_users_own_worker_setting_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # Ray refuses a job env and a driver env naming one variable
    settings = worker_env()
    assert "MALLOC_ARENA_MAX" not in settings
    assert set(settings) == set(WORKER_ENV) - {"MALLOC_ARENA_MAX"}


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux's")
def test_worker_threads_share_the_usable_cpus_among_the_nodes_workers(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert worker_threads(0, 1) == 8 and worker_threads(0, 3) == 2
    assert worker_threads(0, 16) == 1  # more workers than CPUs: still one thread each
    assert worker_threads(3, 1) == 3  # scaling.threads_per_worker, when set, wins


def test_the_dashboard_is_off_unless_asked_for(monkeypatch):
    monkeypatch.delenv(DASHBOARD_ENV, raising=False)
    assert wants_dashboard() is False
    monkeypatch.setenv(DASHBOARD_ENV, "1")
    assert wants_dashboard() is True
    monkeypatch.setenv(DASHBOARD_ENV, "0")
    assert wants_dashboard() is False


def test_an_unclear_dashboard_setting_is_an_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv(DASHBOARD_ENV, "yes")
    with pytest.raises(ValueError, match=r"\$MALLOWS_RAY_DASHBOARD='yes'.*1.*0"):
        wants_dashboard()
