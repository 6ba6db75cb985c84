"""The chunked log-prob / entropy path equals the naive full-logits computation, and stays memory-bounded."""

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mallows_ray.losses import IGNORE_INDEX, response_logprobs


def naive(hidden, weight, labels, bias=None):
    """Full [B, T, V] logits: the obvious computation the chunked path must reproduce."""
    logits = hidden @ weight.T + (0 if bias is None else bias)
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
    mask = labels != IGNORE_INDEX
    token = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
    entropy = -(logp.exp() * logp).sum(-1) * mask
    count = mask.sum(1)
    return token.sum(1), count, (entropy.sum(1) / count.clamp(min=1) / math.log(weight.shape[0])).detach()


def make(batch=3, seq=7, hidden=8, vocab=23, dtype=torch.float32, seed=0):
    """Rows with a prompt (4 labels), with padding (5 labels) and with no labels at all: M = 9."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=g).to(dtype)
    w = torch.randn(vocab, hidden, generator=g).to(dtype)
    b = torch.randn(vocab, generator=g).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, :3] = IGNORE_INDEX   # a prompt
    labels[1, -2:] = IGNORE_INDEX  # padding
    labels[2, :] = IGNORE_INDEX    # a row with no response tokens at all
    return h, w, b, labels


@pytest.mark.parametrize("chunk", [1, 2, 4, 5, 9, 100, None])  # 2, 4, 5 do not divide M = 9
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_naive_values_and_grads(chunk, with_bias):
    h, w, b, labels = make()
    leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
    stats = response_logprobs(leaves[0], leaves[1], labels, bias=leaves[2] if with_bias else None, chunk_tokens=chunk)
    ref_leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
    ref_sum, ref_count, ref_entropy = naive(ref_leaves[0], ref_leaves[1], labels, ref_leaves[2] if with_bias else None)
    assert torch.allclose(stats.logp_sum, ref_sum, atol=1e-5)
    assert torch.equal(stats.token_count, ref_count) and stats.token_count.tolist() == [4, 5, 0]
    assert stats.token_count.dtype == torch.long
    assert torch.allclose(stats.mean_entropy, ref_entropy, atol=1e-5) and stats.mean_entropy[2] == 0
    assert stats.mean_entropy.dtype == torch.float32 and not stats.mean_entropy.requires_grad
    assert ((stats.mean_entropy >= 0) & (stats.mean_entropy <= 1)).all()
    weights = torch.tensor([1.0, -2.0, 0.5])  # an arbitrary downstream use of the sums
    (stats.logp_sum * weights).sum().backward()
    (ref_sum * weights).sum().backward()
    for mine, theirs in zip(leaves[: 3 if with_bias else 2], ref_leaves):
        assert torch.allclose(mine.grad, theirs.grad, atol=1e-5)
    assert stats.token_count.tolist() == [4, 5, 0]  # n(y): the labelled tokens of each row


def test_float64_gradcheck():
    h, w, b, labels = make(batch=3, seq=4, hidden=3, vocab=5, dtype=torch.float64)
    fn = lambda h_, w_, b_: response_logprobs(h_, w_, labels, bias=b_, chunk_tokens=2).logp_sum  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_(True) for t in (h, w, b)))
    fn = lambda h_, w_: response_logprobs(h_, w_, labels, chunk_tokens=3).logp_sum  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h.detach().requires_grad_(True), w.detach().requires_grad_(True)))


def test_only_some_inputs_need_grad():
    h, w, _, labels = make()
    h.requires_grad_(True)
    stats = response_logprobs(h, w, labels, chunk_tokens=4)
    stats.logp_sum.sum().backward()
    ref_h = h.detach().clone().requires_grad_(True)
    naive(ref_h, w, labels)[0].sum().backward()
    assert torch.allclose(h.grad, ref_h.grad, atol=1e-5) and w.grad is None


def test_without_entropy_and_without_grad():
    h, w, _, labels = make()
    h.requires_grad_(True)
    with torch.no_grad():
        stats = response_logprobs(h, w, labels, with_entropy=False, max_chunk_bytes=1)  # one row per chunk
    assert stats.logp_sum.grad_fn is None
    assert torch.allclose(stats.logp_sum, naive(h, w, labels)[0], atol=1e-5)
    assert (stats.mean_entropy == 0).all() and stats.mean_entropy.dtype == torch.float32
    plain = response_logprobs(h.detach(), w, labels)  # nothing requires grad: the same loop, no autograd
    assert plain.logp_sum.grad_fn is None and torch.allclose(plain.logp_sum, stats.logp_sum, atol=1e-5)


def test_bfloat16_inputs():
    """bf16 matmul, float32 statistics, gradients in the inputs' dtype (the GPU configuration)."""
    h, w, _, labels = make(dtype=torch.bfloat16)
    h.requires_grad_(True), w.requires_grad_(True)
    stats = response_logprobs(h, w, labels, chunk_tokens=4)
    assert stats.logp_sum.dtype == torch.float32 and stats.mean_entropy.dtype == torch.float32
    ref_sum, _, ref_entropy = naive(h.float(), w.float(), labels)
    assert torch.allclose(stats.logp_sum, ref_sum, rtol=2e-2, atol=0.3)
    assert torch.allclose(stats.mean_entropy, ref_entropy, atol=2e-2)
    stats.logp_sum.sum().backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16


PEAK_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    sys.path.insert(0, {root!r})
    from mallows_ray.losses import response_logprobs
    torch.manual_seed(0)
    B, T, H, V = 4, 512, 64, 128000  # every position labelled: M = 2048 rows
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = (torch.randn(V, H) * 0.02).requires_grad_(True)
    labels = torch.randint(0, V, (B, T))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, peak so far (inputs included)
    if sys.argv[1] == "chunked":
        stats = response_logprobs(hidden, weight, labels)  # default chunk budget, entropy included
        stats.logp_sum.sum().backward()
    else:
        logp = torch.log_softmax(hidden @ weight.T, -1)  # [B, T, V] float32: 1 GiB
        token = logp.gather(-1, labels[..., None])
        entropy = -(logp.exp() * logp).sum(-1)
        token.sum().backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) / 1024)  # MiB growth of the peak resident set
    """
)


def test_peak_memory_far_below_naive(tmp_path):
    """Batch 4 x 512 tokens x 128k vocab, forward + backward, each mode in a fresh process."""
    script = tmp_path / "peak.py"
    script.write_text(PEAK_SCRIPT.format(root=str(Path(__file__).resolve().parents[2])))
    growth = {}
    for mode in ("chunked", "naive"):
        out = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        growth[mode] = float(out.stdout.strip().splitlines()[-1])
    message = f"peak RSS growth: chunked {growth['chunked']:.0f} MiB vs naive {growth['naive']:.0f} MiB"
    print(message)
    assert growth["naive"] > 1024, message  # the naive logits alone are 1 GiB: the measurement is meaningful
    assert growth["chunked"] < growth["naive"] / 4, message
