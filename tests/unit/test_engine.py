"""The training engine's optimizer: fused AdamW takes the same steps as torch's for-loop AdamW; the global grad
norm from chunked dot products is torch's within float rounding, and clipping inside the fused step equals
`clip_grad_norm_` before it."""

import pytest
import torch

from mallows_ray.config import LoraConfig, ModelConfig, OptimConfig
from mallows_ray.train.engine import NORM_CHUNK, build_optimizer, build_policy, clipped_in_step, grad_norm


def test_fused_adamw_matches_the_for_loop_implementation():
    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(32), torch.randn(7, 5, 3)]
    optim = OptimConfig(lr=1e-2, weight_decay=0.1, betas=[0.9, 0.95])
    runs = []
    for fused in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        if fused:
            optimizer = build_optimizer(params, optim)
        else:
            optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas),
                                          weight_decay=optim.weight_decay, foreach=False)
        for step in range(20):
            g = torch.Generator().manual_seed(step)  # the same gradients for both runs
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            optimizer.step()
        runs.append(params)
    assert runs[0][0].sub(start[0]).abs().max() > 0.1  # it moved: 20 steps of lr 1e-2
    for fused, plain in zip(*runs):
        assert torch.allclose(fused, plain, atol=1e-6, rtol=0)


def test_grad_norm_is_the_float64_norm_within_fp32_rounding():
    g = torch.Generator().manual_seed(0)
    # one gradient of several chunks (a remainder chunk too), small ones, a 0-d one
    grads = [torch.randn(3 * NORM_CHUNK + 17, generator=g) * 1e-2 + 3e-3, torch.randn(64, 32, generator=g),
             torch.randn(7, generator=g), torch.tensor(0.5)]
    exact = torch.cat([t.double().reshape(-1) for t in grads]).norm().item()
    assert grad_norm(grads).item() == pytest.approx(exact, rel=1e-6)
    assert grad_norm(grads).item() == pytest.approx(torch.nn.utils.get_total_norm(grads).item(), rel=1e-4)



def test_grad_norm_of_bf16_gradients_is_an_fp32_sum_the_fused_step_takes():
    """bf16 gradients (a bf16 model's step, `benchmarks/step_mallows.py --dtype bfloat16`): the norm sums in fp32,
    and the fused AdamW accepts it as its grad_scale (it refuses a bf16 one)."""
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(2 * NORM_CHUNK + 5, generator=g).bfloat16(), torch.randn(33, 9, generator=g).bfloat16()]
    norm = grad_norm(grads)
    assert norm.dtype == torch.float32
    # fp32 rounding over 2.5M squares (a bf16 sum would be off by ~1e-3)
    assert norm.item() == pytest.approx(torch.cat([t.double().reshape(-1) for t in grads]).norm().item(), rel=1e-5)
    param = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    param.grad = torch.full((3,), 4.0, dtype=torch.bfloat16)
    optimizer = build_optimizer([param], OptimConfig(lr=0.5))
    with clipped_in_step(optimizer, grad_norm([param.grad]), 1.0):
        optimizer.step()
    assert torch.all(param < 1)


def _five_steps(start: list[torch.Tensor], clipping: str, max_grad_norm: float) -> list[torch.nn.Parameter]:
    """Five fused AdamW steps from `start` on gradients whose norms differ from step to step, clipped
    "in_step" (`clipped_in_step`), "before" (`clip_grad_norm_`) or not at all ("none")."""
    params = [torch.nn.Parameter(t.clone()) for t in start]
    optimizer = build_optimizer(params, OptimConfig(lr=1e-2, weight_decay=0.1))
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * (step + 1)
        if clipping == "in_step":
            with clipped_in_step(optimizer, grad_norm([p.grad for p in params]), max_grad_norm):
                optimizer.step()
            assert not hasattr(optimizer, "grad_scale")  # the next step is unscaled unless asked again
            continue
        if clipping == "before" and max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
    return params


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.3, 1e9])  # no clipping, clipping, a bound above the norm
def test_clipping_in_the_fused_step_equals_clip_grad_norm_before_it(max_grad_norm):
    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(32)]
    in_step = _five_steps(start, "in_step", max_grad_norm)
    for a, b in zip(in_step, _five_steps(start, "before", max_grad_norm)):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    if max_grad_norm == 0.3:  # the check can fail: unclipped steps land elsewhere
        unclipped = _five_steps(start, "none", max_grad_norm)
        assert max((a - b).abs().max() for a, b in zip(unclipped, in_step)) > 1e-4


def test_clipping_in_the_step_refuses_an_unfused_optimizer():
    param = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(TypeError, match="fused"):
        with clipped_in_step(torch.optim.AdamW([param], fused=False), torch.tensor(5.0), 1.0):
            pass


@pytest.mark.parametrize("lora", [None, {"rank": 4, "dropout": 0.1}])
def test_the_policy_trains_in_train_mode_from_its_first_step(tiny_model_dir, lora):
    model = ModelConfig(name_or_path=str(tiny_model_dir), lora=None if lora is None else LoraConfig(**lora))
    policy = build_policy(model, str(tiny_model_dir), torch.float32, zero_stage=0)
    # from_pretrained returns eval mode; the dropout of a LoRA adapter would be off until the first evaluation
    assert all(module.training for module in policy.modules())
