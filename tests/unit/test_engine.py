"""The training engine's optimizer: fused AdamW takes the same steps as torch's for-loop AdamW."""

import torch

from mallows_ray.config import OptimConfig
from mallows_ray.train.engine import build_optimizer


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
