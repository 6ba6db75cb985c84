"""The chunked log-prob / entropy path equals the naive full-logits computation, and stays memory-bounded."""

import math
import subprocess
import sys
import textwrap

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
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=g, dtype=dtype)
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype)
    b = torch.randn(vocab, generator=g, dtype=dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, :3] = IGNORE_INDEX   # a prompt
    labels[1, -2:] = IGNORE_INDEX  # padding
    labels[2, :] = IGNORE_INDEX    # a row with no response tokens at all
    return h, w, b, labels


@pytest.mark.parametrize("chunk", [1, 4, 5, None])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_naive_values_and_grads(chunk, with_bias):
    h, w, b, labels = make()
    bias = b if with_bias else None
    leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
    stats = response_logprobs(leaves[0], leaves[1], labels, bias=leaves[2] if with_bias else None, chunk_tokens=chunk)
    ref_leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
    ref_sum, ref_count, ref_entropy = naive(ref_leaves[0], ref_leaves[1], labels, ref_leaves[2] if with_bias else None)
    assert torch.allclose(stats.logp_sum, ref_sum, atol=1e-5)
    assert torch.equal(stats.token_count, ref_count) and stats.token_count[2] == 0
    assert torch.allclose(stats.mean_entropy, ref_entropy, atol=1e-5) and stats.mean_entropy[2] == 0
    weights = torch.tensor([1.0, -2.0, 0.5])  # an arbitrary downstream use of the sums
    (stats.logp_sum * weights).sum().backward()
    (ref_sum * weights).sum().backward()
    for mine, theirs in zip(leaves[: 3 if with_bias else 2], ref_leaves):
        assert torch.allclose(mine.grad, theirs.grad, atol=1e-5)
    assert not stats.mean_entropy.requires_grad
    assert stats.logp_mean[0].item() == pytest.approx((stats.logp_sum[0] / stats.token_count[0]).item())


def test_float64_gradcheck():
    h, w, b, labels = make(batch=3, seq=4, hidden=3, vocab=5, dtype=torch.float64)
    fn = lambda h_, w_, b_: response_logprobs(h_, w_, labels, bias=b_, chunk_tokens=2).logp_sum  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_(True) for t in (h, w, b)))


def test_without_entropy_and_under_no_grad():
    h, w, _, labels = make()
    with torch.no_grad():
        stats = response_logprobs(h, w, labels, with_entropy=False, max_chunk_bytes=1)
    assert torch.allclose(stats.logp_sum, naive(h, w, labels)[0], atol=1e-5)
    assert (stats.mean_entropy == 0).all()


PEAK_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    sys.path.insert(0, {root!r})
    from mallows_ray.losses import response_logprobs
    torch.manual_seed(0)
    B, T, H, V = 4, 512, 64, 128000
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H) * 0.02
    weight.requires_grad_(True)
    labels = torch.randint(0, V, (B, T))
    torch.ones(1)  # warm the allocator before the baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.argv[1] == "chunked":
        stats = response_logprobs(hidden, weight, labels)  # default chunk budget
        stats.logp_sum.sum().backward()
    else:
        logp = torch.log_softmax(hidden @ weight.T, -1)
        token = logp.gather(-1, labels[..., None])
        entropy = -(logp.exp() * logp).sum(-1)
        token.sum().backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) / 1024)  # MiB growth of the peak resident set
    """
)


def test_peak_memory_far_below_naive(tmp_path):
    """Batch 4 x 512 tokens x 128k vocab: naive float32 logits alone are 1 GiB (plus autograd copies)."""
    root = str(__import__("pathlib").Path(__file__).resolve().parents[2])
    script = tmp_path / "peak.py"
    script.write_text(PEAK_SCRIPT.format(root=root))
    growth = {}
    for mode in ("chunked", "naive"):
        out = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        growth[mode] = float(out.stdout.strip().splitlines()[-1])
    assert growth["chunked"] < growth["naive"] / 4, (
        f"peak RSS growth: chunked {growth['chunked']:.0f} MiB vs naive {growth['naive']:.0f} MiB"
    )
    print(f"peak RSS growth: chunked {growth['chunked']:.0f} MiB, naive {growth['naive']:.0f} MiB")
