"""runtime.py without Ray: which allocator settings the workers are given."""

from mallows_ray.runtime import ALLOCATOR_ENV, allocator_env


def test_allocator_env_gives_every_setting_the_user_has_not_set(monkeypatch):
    for key in ALLOCATOR_ENV:
        monkeypatch.delenv(key, raising=False)
    assert allocator_env() == ALLOCATOR_ENV
    assert ALLOCATOR_ENV["MALLOC_ARENA_MAX"] == "1" and ALLOCATOR_ENV["MALLOC_MMAP_MAX_"] == "0"


def test_a_users_own_allocator_setting_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # Ray refuses a job env and a driver env naming one variable
    settings = allocator_env()
    assert "MALLOC_ARENA_MAX" not in settings
    assert set(settings) == set(ALLOCATOR_ENV) - {"MALLOC_ARENA_MAX"}
