"""The DeepSpeed engine on one rank, fp32 stage 0, takes the optimizer steps of plain torch: the engine skips
the all-reduce (nothing to average), `backward` accumulates micro-batches of any size and number up to the
step's boundary, and `optimizer_step` computes the grad norm once and clips with it (`engine.clips_itself`), so
the steps must equal backward + `clip_grad_norm_` + the same AdamW. Its
communication backend starts without compiling the shared-memory kernel (`skip_shared_memory_all_reduce`)."""

import copy
import socket

import deepspeed
import pytest
import torch

from mallows_ray.config import load_config
from mallows_ray.data.collate import pack_responses
from mallows_ray.train.engine import (
    backward,
    build_engine,
    build_optimizer,
    build_policy,
    deepspeed_config,
    optimizer_step,
)


@pytest.fixture
def one_rank(monkeypatch):
    """The environment `deepspeed.initialize` reads to start a one-process gloo group; destroyed after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_one_rank_fp32_steps_equal_plain_torch(tiny_model_dir, one_rank):
    max_norm = 0.05  # below the tiny model's grad norms, so every step clips
    config = load_config(None, [f"model.name_or_path={tiny_model_dir}", "optim.lr=1e-3", "optim.schedule=constant",
                                "optim.warmup_steps=0", f"optim.max_grad_norm={max_norm}",
                                "batch.micro_batch_size=1", "batch.gradient_accumulation=2", "deepspeed.zero_stage=0"])
    assert deepspeed_config(config, torch.float32)["gradient_clipping"] == 0.0  # clipped by optimizer_step
    assert deepspeed_config(config, torch.bfloat16)["gradient_clipping"] == max_norm  # by DeepSpeed's optimizer
    policy = build_policy(config.model, str(tiny_model_dir), torch.float32, zero_stage=0)
    plain = copy.deepcopy(policy)
    engine = build_engine(policy, config, torch.float32, total_steps=3)
    assert not engine.enable_backward_allreduce  # one rank: no bucket flattening and copying back
    assert deepspeed.comm.comm.cdb.shm_comm_op is None  # the inference-only kernel was not compiled
    optimizer = build_optimizer(list(plain.parameters()), config.optim)

    # steps of 3 prompts cut into micro-batches of varying sizes and number (as `batch.max_tokens` cuts them),
    # none matching the configured accumulation of 2: `backward` sets DeepSpeed's own division and count aside
    g = torch.Generator().manual_seed(0)

    def tokens(length: int) -> list[int]:
        return torch.randint(3, 200, (length,), generator=g).tolist()

    steps = [[1, 2], [3], [1, 1, 1]]
    for sizes in steps:
        for i, size in enumerate(sizes):
            inputs = pack_responses([tokens(5 + p) for p in range(size)], [[tokens(4), tokens(6)]] * size,
                                    pad_id=0, share_prompt=True, pack=True).model_inputs()
            backward(engine, engine(**inputs).sum() / sum(sizes), boundary=i == len(sizes) - 1)
            norm = optimizer_step(engine, max_norm)
            assert (norm is None) == (i < len(sizes) - 1)  # a norm at the step's last micro-batch only
            (plain(**inputs).sum() / sum(sizes)).backward()
        expected = float(torch.nn.utils.clip_grad_norm_(plain.parameters(), max_norm))
        optimizer.step()
        optimizer.zero_grad()
        assert expected > max_norm and norm == pytest.approx(expected, rel=1e-5)
    assert engine.global_steps == len(steps)  # one optimizer step per step, whatever its micro-batches
    for (name, trained), reference in zip(engine.module.named_parameters(), plain.parameters()):
        assert torch.allclose(trained, reference, atol=1e-6, rtol=0), name
    moved = max((t - s).abs().max() for t, s in zip(plain.parameters(), build_policy(
        config.model, str(tiny_model_dir), torch.float32, zero_stage=0).parameters()))
    assert moved > 1e-4  # the steps changed the weights
