"""Shared fixtures: a tiny real model folder, and a real local Ray instance for integration tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with a byte-level ChatML tokenizer, saved as safetensors."""
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture(scope="session")
def ray_local():
    """A real single-node Ray instance on loopback (4 logical CPUs), stopped at the end of the session."""
    import ray

    from mallows_ray.runtime import ensure_ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # 4 logical CPUs on a 2-core machine: logical CPUs are scheduling tokens. A Ray Train run can leave its
    # 0.5-CPU placement group behind when its controller outlives the run (seen after an interrupted Tune
    # sweep), and Ray Data's 1-CPU write/filter tasks next to a 0.5-CPU scoring actor then wait forever on 2.
    # through ensure_ray, as every command starts Ray: the workers get the allocator settings, no dashboard
    ensure_ray("local", num_cpus=4, _node_ip_address="127.0.0.1", configure_logging=False)
    yield ray
    ray.shutdown()
