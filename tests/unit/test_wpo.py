"""WPO weighting: the aligned log-prob a(y) of the chunked path against full logits, the weighted loss by hand
and against TRL 1.16's `use_weighting` formula, the forward -> loss plumbing, and the config checks."""

import math

import pytest
import torch
from test_logprobs import make, naive
from test_train_batches import _row

from mallows_ray.config import load_config
from mallows_ray.losses import IGNORE_INDEX, PairwiseInputs, build_loss, response_logprobs
from mallows_ray.train.batches import collate
from mallows_ray.train.objective import forward_loss
from mallows_ray.typed_config import ConfigError

D = torch.float64


def naive_aligned(hidden, weight, labels, bias=None):
    """a(y) [B] = mean over labelled t of log p(y_t) - log sum_v p_v^2, from full [B, T, V] logits."""
    logp = torch.log_softmax((hidden @ weight.T + (0 if bias is None else bias)).double(), -1)
    mask = labels != IGNORE_INDEX
    token = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    log_sum_sq = torch.logsumexp(2 * logp, -1)
    return ((token - log_sum_sq) * mask).sum(1) / mask.sum(1).clamp(min=1)


@pytest.mark.parametrize("chunk", [1, 4, None])
def test_aligned_logp_matches_full_logits_and_leaves_gradients_alone(chunk):
    h, w, b, labels = make()
    leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
    stats = response_logprobs(*leaves[:2], labels, bias=leaves[2], chunk_tokens=chunk, with_wpo=True)
    assert torch.allclose(stats.aligned_logp_mean.double(), naive_aligned(h, w, labels, b), atol=1e-5)
    assert stats.aligned_logp_mean[2] == 0 and not stats.aligned_logp_mean.requires_grad  # a row without labels
    stats.logp_sum.sum().backward()
    ref = [t.clone().requires_grad_(True) for t in (h, w, b)]
    naive(*ref[:2], labels, ref[2])[0].sum().backward()
    for mine, theirs in zip(leaves, ref):
        assert torch.allclose(mine.grad, theirs.grad, atol=1e-5)
    with torch.no_grad():
        plain = response_logprobs(h, w, labels, bias=b, chunk_tokens=chunk)
    assert plain.aligned_logp_mean is None and torch.allclose(plain.logp_sum, stats.logp_sum.detach())


def test_a_uniform_policy_has_weight_one():
    # p uniform over V: log p(y_t) = -log V and log sum_v p_v^2 = log(V / V^2) = -log V, so a(y) = 0
    h, w, _, labels = make()
    stats = response_logprobs(h, torch.zeros_like(w), labels, with_wpo=True)
    assert torch.allclose(stats.aligned_logp_mean, torch.zeros(3), atol=1e-6)


def _pairs(a_w, a_l):
    t = lambda *v: torch.tensor(v, dtype=D)  # noqa: E731
    return PairwiseInputs(t(-1.0, -2.0), t(-2.0, -1.0), t(-1.5, -1.5), t(-1.5, -1.5), t(1.0, 1.0), t(1.0, 1.0),
                          None, t(*a_w), t(*a_l))


def test_weighted_loss_by_hand_and_trls_formula():
    x = _pairs([-0.5, -1.0], [-0.25, -2.0])
    plain = build_loss("dpo", beta=1.0)(x)
    weighted = build_loss("dpo", beta=1.0, wpo=True)(x)
    # d = [1, -1]: -logsigmoid(d) times exp(-0.75), exp(-3)
    assert weighted.losses.tolist() == pytest.approx([math.log1p(math.exp(-1)) * math.exp(-0.75),
                                                      math.log1p(math.exp(1)) * math.exp(-3.0)])
    assert torch.equal(weighted.chosen_rewards, plain.chosen_rewards)
    # TRL: per_sequence_loss *= exp(mean aligned chosen) * exp(mean aligned rejected), for every loss type
    for name in ("hinge", "bco_pair", "nll", "ipo"):
        want = build_loss(name)(x).losses * torch.exp(x.policy_chosen_aligned) * torch.exp(x.policy_rejected_aligned)
        torch.testing.assert_close(build_loss(name, wpo=True)(x).losses, want, rtol=0, atol=1e-12)
    torch.autograd.gradcheck(lambda pc: build_loss("sigmoid_norm", wpo=True)(
        PairwiseInputs(pc, *list(x.__dict__.values())[1:])).losses, (x.policy_chosen_logps.clone().requires_grad_(),))
    with pytest.raises(ValueError, match="aligned log-probs"):
        build_loss("dpo", wpo=True)(PairwiseInputs(*list(x.__dict__.values())[:6]))


def test_forward_loss_hands_the_aligned_log_probs_to_the_loss():
    batch = collate([_row(0), _row(1, response_lens=(3, 2))], pad_id=0, with_scores=False)
    logps = torch.tensor([-1.0, -5.0, -2.0, -1.5])
    aligned = torch.tensor([-0.1, -0.2, -0.3, -0.4])  # rows: p0 chosen, p0 rejected, p1 chosen, p1 rejected
    plain = forward_loss(lambda **inputs: logps, batch, build_loss("dpo", beta=0.5))
    out = forward_loss(lambda **inputs: (logps, aligned), batch, build_loss("dpo", beta=0.5, wpo=True))
    assert torch.allclose(out.losses, plain.losses * torch.exp(torch.tensor([-0.3, -0.7])))


def test_wpo_config():
    assert load_config(None, ["loss.name=dpo", "loss.wpo=true"]).loss.build().wpo
    assert not load_config(None, ["loss.name=dpo"]).loss.build().wpo
    terms = load_config(None, ["loss={terms: [{name: dpo}, {name: nll, params: {wpo: true}}]}"]).loss
    assert terms.build().wpo
    for name, needle in (("aot", "quantile of the sorted batch"), ("listwise", "this loss is listwise")):
        with pytest.raises(ConfigError, match=needle):
            load_config(None, [f"loss.name={name}", "loss.wpo=true"])
    with pytest.raises(ConfigError, match="'wpo' must be true or false"):
        load_config(None, ["loss.name=dpo", "loss.wpo=1"])
