"""The loss library against hand-derived numbers, identities, brute force and float64 gradcheck."""

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from mallows_ray.losses import (
    SPECS,
    EntropyAggregate,
    ListwiseInputs,
    PairwiseInputs,
    Term,
    build_composite,
    build_loss,
    dispersion_from_entropy,
    kendall_link,
    loss_parameters,
    loss_spec,
    mixed_target,
    prompt_mean_entropy,
)

D = torch.float64
LOSSES = list(SPECS)
PAIRWISE_LOSSES = [name for name, spec in SPECS.items() if spec.kind == "pairwise"]
LISTWISE_LOSSES = [name for name, spec in SPECS.items() if spec.kind == "listwise"]
# the listwise losses over implicit rewards (listwise_nll, a likelihood term, and lambda_contrast, whose softmax
# runs over lambdas, have their own tests)
RANKING_LOSSES = [name for name in LISTWISE_LOSSES if not (SPECS[name].likelihood or SPECS[name].across_lambdas)]


def pairwise(pc, pr, rc=0.0, rr=0.0, nc=1.0, nr=1.0, s=None, requires_grad=False, dtype=D):
    """PairwiseInputs (float64 by default); scalars broadcast to the batch of `pc`."""
    t = lambda v: torch.as_tensor(v, dtype=dtype).reshape(-1)  # noqa: E731
    pc, pr = t(pc).clone().requires_grad_(requires_grad), t(pr).clone().requires_grad_(requires_grad)
    expand = lambda v: t(v).expand(pc.shape[0]).clone()  # noqa: E731
    return PairwiseInputs(pc, pr, expand(rc), expand(rr), expand(nc), expand(nr), None if s is None else expand(s))


def listwise_inputs(lp, ref=None, target=None, mask=None, s=None, lengths=None):
    lp = torch.as_tensor(lp, dtype=D)
    zeros = torch.zeros_like(lp)
    return ListwiseInputs(
        lp, zeros if ref is None else torch.as_tensor(ref, dtype=D),
        torch.ones_like(lp) if lengths is None else torch.as_tensor(lengths, dtype=D),
        torch.as_tensor(target, dtype=D), mask, None if s is None else torch.as_tensor(s, dtype=D),
    )


def logsig(x):
    return -math.log1p(math.exp(-x))


# --- section 1: hand-derived values ------------------------------------------------------------------------


def test_dpo_hand_values():
    # beta = 1, u = 0 -> -logsigmoid(0) = log 2
    assert build_loss("dpo", beta=1.0)(pairwise(0.0, 0.0)).losses.item() == pytest.approx(math.log(2))
    # lp_w=-1, ref_w=-2, lp_l=-3, ref_l=-2: u = 1 - (-1) = 2; beta = 0.5 -> -logsigmoid(1) = log(1 + e^-1) = 0.3132617
    out = build_loss("dpo", beta=0.5)(pairwise(-1.0, -3.0, -2.0, -2.0))
    assert out.losses.item() == pytest.approx(0.31326169, abs=1e-8)
    assert out.chosen_rewards.item() == pytest.approx(0.5) and out.rejected_rewards.item() == pytest.approx(-0.5)
    assert out.accuracy.item() == 1.0 and not out.chosen_rewards.requires_grad


def test_cdpo_and_robust_hand_values():
    x = pairwise(-1.0, -3.0, -2.0, -2.0)  # u = 2, beta = 0.5 -> z = 1
    eps = 0.2
    # cdpo: 0.8 * 0.3132617 + 0.2 * 1.3132617 = 0.5132617
    assert build_loss("cdpo", beta=0.5, label_smoothing=eps)(x).losses.item() == pytest.approx(0.51326169, abs=1e-8)
    # robust: (0.8 * 0.3132617 - 0.2 * 1.3132617) / 0.6 = (0.2506094 - 0.2626523) / 0.6 = -0.0200716
    assert build_loss("robust", beta=0.5, label_smoothing=eps)(x).losses.item() == pytest.approx(-0.02007165, abs=1e-8)
    assert build_loss("robust", beta=0.5, label_smoothing=0.0)(x).losses.item() == pytest.approx(-logsig(1.0))
    for name in ("cdpo", "robust", "mallows_theta"):
        with pytest.raises(ValueError, match="label_smoothing"):
            build_loss(name, label_smoothing=0.5)(pairwise(0.0, 0.0, s=1.0))


def test_ipo_uses_per_token_means_and_sum_rewards():
    # chosen ratio 4 over 4 tokens = 1, rejected ratio -2 over 2 tokens = -1: u_avg = 2
    x = pairwise(0.0, -2.0, -4.0, 0.0, nc=4.0, nr=2.0, s=3.0)
    assert build_loss("ipo", beta=0.25)(x).losses.item() == pytest.approx(0.0)  # 1/(2 beta) = 2
    out = build_loss("ipo", beta=0.5)(x)
    assert out.losses.item() == pytest.approx((2 - 1) ** 2)
    # implicit rewards are beta * (lp - ref) of the sums (section 1): 0.5 * 4, 0.5 * -2
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((2.0, -1.0))
    # plug-in scales the residual: (3 * (2 - 1))^2 = 9
    assert build_loss("ipo", beta=0.5, dispersion=True)(x).losses.item() == pytest.approx(9.0)


def test_simpo_hand_value_and_plug_in_scales_the_margin():
    # means -2/2 = -1.0 and -4.5/3 = -1.5, beta = 2, gamma = 0.5: z = 2 * 0.5 - 0.5 = 0.5; reference ignored
    x = pairwise(-2.0, -4.5, 7.0, -7.0, nc=2.0, nr=3.0, s=2.0)
    out = build_loss("simpo", beta=2.0, gamma=0.5)(x)
    assert out.losses.item() == pytest.approx(-logsig(0.5))  # 0.474077
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((-2.0, -3.0))
    # plug-in: s * (beta * margin - gamma) = 2 * 0.5 = 1, not 2 * 1 - 0.5
    assert build_loss("simpo", beta=2.0, gamma=0.5, dispersion=True)(x).losses.item() == pytest.approx(-logsig(1.0))


def test_plug_in_scales_the_logit_and_requires_dispersion():
    x = pairwise([-1.0], [-2.0], s=2.0)  # u = 1, beta = 0.1 -> z = 0.1, plug-in 0.2
    assert build_loss("dpo", beta=0.1, dispersion=True)(x).losses.item() == pytest.approx(-logsig(0.2))
    assert build_loss("robust", beta=0.1, label_smoothing=0.0, dispersion=True)(x).losses.item() == pytest.approx(
        -logsig(0.2))
    for name in LOSSES:
        params = {"dispersion": True} if "dispersion" in loss_parameters(name) else {}
        if build_loss(name, **params).reads_dispersion:
            x = pairwise(0.0, 0.0) if name in PAIRWISE_LOSSES else listwise_inputs([[0.0, 1.0]], target=[[1.0, 0.0]])
            with pytest.raises(ValueError, match="dispersion"):
                build_loss(name, **params)(x)


# --- identities --------------------------------------------------------------------------------------------


def test_mallows_theta_with_unit_dispersion_is_dpo_and_cdpo():
    x = pairwise([-1.0, -2.0, 0.3], [-2.0, -1.0, 0.1], [-1.5, -1.2, 0.0], [-1.0, -1.9, 0.2], s=1.0)
    assert torch.allclose(build_loss("mallows_theta", beta=0.3)(x).losses, build_loss("dpo", beta=0.3)(x).losses)
    assert torch.allclose(build_loss("mallows_theta", beta=0.3, label_smoothing=0.1)(x).losses,
                          build_loss("cdpo", beta=0.3, label_smoothing=0.1)(x).losses)
    # and with any s it is DPO at beta * s
    y = pairwise(-1.0, -2.0, s=2.5)
    assert build_loss("mallows_theta", beta=0.3)(y).losses.item() == pytest.approx(-logsig(0.75))


@pytest.mark.parametrize("loss", RANKING_LOSSES)
def test_listwise_n2_one_hot_equals_dpo(loss):
    pc, pr, rc, rr = [-1.0, -3.0, 0.5], [-2.0, -1.0, 0.2], [-1.2, -2.0, 0.0], [-1.1, -1.5, 0.4]
    s = [0.5, 1.0, 2.0]
    x = listwise_inputs(torch.tensor([pc, pr]).T, torch.tensor([rc, rr]).T, [[1.0, 0.0]] * 3, s=s)
    for dispersion in (False, True):
        dpo = build_loss("dpo", beta=0.7, dispersion=dispersion)(pairwise(pc, pr, rc, rr, s=s))
        out = build_loss(loss, beta=0.7, dispersion=dispersion)(x)
        assert torch.allclose(out.losses, dpo.losses)
        assert torch.equal(out.accuracy, dpo.accuracy)
        assert torch.allclose(out.chosen_rewards, dpo.chosen_rewards * (torch.tensor(s, dtype=D) if dispersion else 1))


def test_listwise_lambda_sum_equals_cross_entropy_against_mixture():
    torch.manual_seed(0)
    scores, lam = torch.randn(4, 3, 5, dtype=D), torch.softmax(torch.randn(4, 3, dtype=D), -1)
    r = torch.randn(4, 5, dtype=D)
    target = mixed_target(scores, lam)
    assert torch.allclose(target.sum(-1), torch.ones(4, dtype=D))
    per_objective = [-(torch.softmax(scores[:, k], -1) * torch.log_softmax(r, -1)).sum(-1) for k in range(3)]
    expected = sum(lam[:, k] * per_objective[k] for k in range(3))
    assert torch.allclose(build_loss("listwise", beta=1.0)(listwise_inputs(r, target=target)).losses, expected)


def test_mixed_target_hand_value():
    # scores [[0, log 3]] with tau = 1 -> softmax [1/4, 3/4]; second objective [[log 3, 0]] -> [3/4, 1/4]
    scores = torch.tensor([[[0.0, math.log(3)], [math.log(3), 0.0]]], dtype=D)
    target = mixed_target(scores, torch.tensor([[0.25, 0.75]], dtype=D))
    assert target[0].tolist() == pytest.approx([0.25 * 0.25 + 0.75 * 0.75, 0.25 * 0.75 + 0.75 * 0.25])
    # tau = 2 halves the logits: softmax [0, log(3)/2] = [1/(1+sqrt 3), sqrt 3/(1+sqrt 3)]
    target = mixed_target(scores, torch.tensor([[1.0, 0.0]], dtype=D), tau=2.0)
    assert target[0, 0].item() == pytest.approx(1 / (1 + math.sqrt(3)))


def test_listwise_length_normalize_and_metrics():
    # ratios [4, 2, -3] over lengths [4, 1, 3] -> per-token [1, 2, -1]; beta = 1; target top = response 0
    x = listwise_inputs([[4.0, 2.0, -3.0]], target=[[0.6, 0.3, 0.1]], lengths=[[4.0, 1.0, 3.0]])
    out = build_loss("listwise", beta=1.0, length_normalize=True)(x)
    log_z = math.log(math.e + math.e**2 + math.e**-1)
    assert out.losses.item() == pytest.approx(-(0.6 * (1 - log_z) + 0.3 * (2 - log_z) + 0.1 * (-1 - log_z)))
    # chosen = reward of the target's top (1.0), rejected = mean of the rest (0.5); argmax r = 1 != 0
    assert (out.chosen_rewards.item(), out.rejected_rewards.item(), out.accuracy.item()) == pytest.approx((1, 0.5, 0))
    # pairs ordered by the target: (0,1) r 1 < 2 wrong, (0,2) 1 > -1 right, (1,2) 2 > -1 right -> 2/3
    assert out.pair_accuracy.item() == pytest.approx(2 / 3)


def test_pair_agreement_ties_and_rows_without_ordered_pairs():
    from mallows_ray.losses.listwise import pair_agreement

    rewards = torch.tensor([[0.0, 0.0, 0.0], [3.0, 1.0, 2.0], [1.0, 2.0, 3.0]], dtype=D)
    target = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.4, 0.4, 0.2]], dtype=D)
    valid = torch.tensor([[True, True, True], [True, True, False], [True, True, True]])
    # row 0: all rewards tied -> 0.5 each pair; row 1: only the pair (0, 1) is valid, ordered right -> 1;
    # row 2: the (0, 1) target tie is not an ordered pair; (0, 2) 1 < 3 wrong, (1, 2) 2 < 3 wrong -> 0
    assert pair_agreement(rewards, target, valid).tolist() == [0.5, 1.0, 0.0]
    no_order = pair_agreement(rewards[:1], torch.full((1, 3), 1 / 3, dtype=D), valid[:1])
    assert no_order.tolist() == [0.5]  # a uniform target orders nothing: chance, not a perfect score


def test_plackett_luce_hand_value_and_ties():
    # target order (stable on the tie): 0, 1, 2 ; r = [1, 0, 2] -> log(e^1/(e^1+e^0+e^2)) + log(e^0/(e^0+e^2)) + 0
    x = listwise_inputs([[1.0, 0.0, 2.0]], target=[[0.4, 0.4, 0.2]])
    expected = -(1 - math.log(math.e + 1 + math.e**2)) - (0 - math.log(1 + math.e**2))
    assert build_loss("plackett_luce", beta=1.0)(x).losses.item() == pytest.approx(expected)



def test_listwise_nll_hand_values():
    # lp = [-4, -2, -6] over n = [2, 1, 3] tokens: per-token means [-2, -2, -2]... make them differ:
    # lp = [-4, -3, -6], n = [2, 1, 3] -> means [-2, -3, -2]; target [0.5, 0.25, 0.25]
    # loss = -(0.5 * -2 + 0.25 * -3 + 0.25 * -2) = 1 + 0.75 + 0.5 = 2.25
    x = listwise_inputs([[-4.0, -3.0, -6.0]], ref=[[9.0, 9.0, 9.0]], target=[[0.5, 0.25, 0.25]],
                        lengths=[[2.0, 1.0, 3.0]])
    out = build_loss("listwise_nll")(x)
    assert out.losses.item() == pytest.approx(2.25)  # the reference (9) is never read
    # rewards are the per-token means; the target's top reply (0) has reward -2, the rest average -2.5
    assert out.chosen_rewards.item() == pytest.approx(-2.0) and out.rejected_rewards.item() == pytest.approx(-2.5)
    # argmax of the rewards is reply 0 (ties with reply 2 go to the first): top-1 agrees
    assert out.accuracy.item() == 1.0


def test_listwise_nll_vertex_target_is_the_top_reply_nll_and_padding_is_inert():
    # a one-hot target makes it the mean-token NLL of that reply alone (pairwise nll's `mean` reduction)
    lp, n = torch.tensor([[-6.0, -1.0, -9.0]], dtype=D), torch.tensor([[3.0, 1.0, 3.0]], dtype=D)
    x = ListwiseInputs(lp, torch.zeros_like(lp), n, torch.tensor([[0.0, 0.0, 1.0]], dtype=D))
    pair = pairwise(-9.0, -1.0, nc=3.0, nr=1.0)
    assert build_loss("listwise_nll")(x).losses.item() == pytest.approx(build_loss("nll")(pair).losses.item())
    # a padding reply with any log-prob changes nothing
    mask = torch.tensor([[True, True, True, False]])
    padded = ListwiseInputs(torch.cat([lp, torch.tensor([[-1e6]], dtype=D)], 1), torch.zeros(1, 4, dtype=D),
                            torch.cat([n, torch.tensor([[1.0]], dtype=D)], 1),
                            torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=D), mask)
    assert build_loss("listwise_nll")(padded).losses.item() == pytest.approx(3.0)


def _copies(lp, target, group, mask=None):
    lp = torch.as_tensor(lp, dtype=D)
    return ListwiseInputs(lp, torch.zeros_like(lp), torch.ones_like(lp), torch.as_tensor(target, dtype=D), mask,
                          group=torch.as_tensor(group))


def test_lambda_contrast_is_the_listwise_loss_transposed_over_a_prompts_lambdas():
    torch.manual_seed(0)
    lp, target = torch.randn(2, 3, 4, dtype=D), torch.softmax(torch.randn(2, 3, 4, dtype=D), dim=-1)  # [G, V, N]
    by_hand = -(target * torch.log_softmax(0.7 * lp, dim=1)).sum(dim=-1)                               # [G, V]
    # rows of the two prompts interleaved, groups named by any values
    order = torch.tensor([0, 3, 1, 4, 2, 5])
    group = torch.tensor([7, 7, 7, 2, 2, 2])[order]
    out = build_loss("lambda_contrast", beta=0.7)(_copies(lp.reshape(6, 4)[order], target.reshape(6, 4)[order], group))
    torch.testing.assert_close(out.losses, by_hand.reshape(6)[order])
    # one row per prompt (evaluation): nothing to contrast, 0
    alone = build_loss("lambda_contrast")(_copies(lp[0], target[0], [0, 1, 2]))
    assert alone.losses.abs().max().item() == 0.0


def test_lambda_contrast_ignores_what_does_not_depend_on_lambda_and_padding():
    torch.manual_seed(1)
    lp, target = torch.randn(6, 3, dtype=D), torch.softmax(torch.randn(6, 3, dtype=D), dim=-1)
    group = [0, 0, 0, 1, 1, 1]
    base = build_loss("lambda_contrast")(_copies(lp, target, group)).losses
    # a per-(prompt, reply) shift, the same under every lambda (e.g. the prompt's own effect): no change
    shift = torch.randn(2, 3, dtype=D).repeat_interleave(3, dim=0)
    torch.testing.assert_close(build_loss("lambda_contrast")(_copies(lp + shift, target, group)).losses, base)
    # a padding reply (target 0, masked) with any log-prob changes nothing
    mask = torch.tensor([[True, True, True, False]] * 6)
    padded = _copies(torch.cat([lp, torch.full((6, 1), -1e6, dtype=D)], 1),
                     torch.cat([target, torch.zeros(6, 1, dtype=D)], 1), group, mask)
    torch.testing.assert_close(build_loss("lambda_contrast")(padded).losses, base)
    # float64 gradients
    fn = build_loss("lambda_contrast", beta=0.5)
    x = lp.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: fn(_copies(v, target, group)).losses, (x,))


def test_lambda_contrast_needs_vertex_copies_in_the_config():
    from mallows_ray.config import Config
    from mallows_ray.typed_config import ConfigError, from_dict

    terms = [{"name": "listwise"}, {"name": "lambda_contrast", "weight": 1.0}]
    with pytest.raises(ConfigError, match="lambda_contrast .* needs lambdas.vertex_copies=true"):
        from_dict(Config, {"loss": {"terms": terms}})
    config = from_dict(Config, {"loss": {"terms": terms}, "lambdas": {"vertex_copies": True}})
    assert config.loss.build().across_lambdas and config.loss.name == "listwise"  # the composite reports listwise
    off = [terms[0], {**terms[1], "weight": 0.0}]  # switched off (the demo's no-conditioning ablation)
    assert not from_dict(Config, {"loss": {"terms": off}, "lambdas": {"condition": False}}).loss.build().across_lambdas


def test_listwise_nll_in_a_composite_reports_the_preference_term():
    from mallows_ray.losses import Term, build_composite

    x = listwise_inputs([[1.0, 0.0, 2.0]], target=[[0.4, 0.4, 0.2]])
    terms = [Term("listwise_nll", 0.5), Term("listwise", 1.0, {"beta": 1.0})]
    out = build_composite(terms)(x)
    plain, nll_ = build_loss("listwise", beta=1.0)(x), build_loss("listwise_nll")(x)
    assert out.losses.item() == pytest.approx(plain.losses.item() + 0.5 * nll_.losses.item())
    assert out.chosen_rewards.item() == pytest.approx(plain.chosen_rewards.item())  # listwise's, not the nll's
    assert set(out.terms) == {"listwise_nll", "listwise"}


@pytest.mark.parametrize("loss", RANKING_LOSSES)
def test_listwise_padding_is_inert(loss):
    torch.manual_seed(1)
    r = torch.randn(2, 3, dtype=D)
    scores = torch.randn(2, 1, 3, dtype=D)
    base = build_loss(loss, beta=1.0)(listwise_inputs(r, target=mixed_target(scores, torch.ones(2, 1, dtype=D))))
    # a padding response with wild values, placed in the middle: loss, metrics and gradients must not notice it
    padded_r = torch.cat([r[:, :1], torch.full((2, 1), 50.0, dtype=D), r[:, 1:]], dim=1).requires_grad_(True)
    mask = torch.tensor([[True, False, True, True]] * 2)
    padded_scores = torch.cat([scores[..., :1], torch.full((2, 1, 1), 9.0, dtype=D), scores[..., 1:]], dim=-1)
    padded_target = mixed_target(padded_scores, torch.ones(2, 1, dtype=D), response_mask=mask)
    assert padded_target[:, 1].abs().max() == 0
    out = build_loss(loss, beta=1.0)(listwise_inputs(padded_r, target=padded_target, mask=mask))
    assert torch.allclose(out.losses, base.losses)
    for field in ("chosen_rewards", "rejected_rewards", "accuracy", "pair_accuracy"):
        assert torch.allclose(getattr(out, field), getattr(base, field)), field
    out.losses.sum().backward()
    assert padded_r.grad[:, 1].abs().max() == 0 and torch.isfinite(padded_r.grad).all()


# --- section 4 test vectors --------------------------------------------------------------------------------


def test_mallows_simpo_vector():
    hbar = prompt_mean_entropy(torch.tensor([[0.03, 0.05]], dtype=D))  # Hbar(x) = 0.04
    s = dispersion_from_entropy(hbar, 0.29)                             # -0.29 log 0.04 = 0.93347
    assert s.item() == pytest.approx(0.93347, abs=1e-5)
    # per-token means -12/12 = -1.0 and -9/6 = -1.5, reference-free; z = 10 * 0.5 = 5, plug-in 4.667
    x = PairwiseInputs(torch.tensor([-12.0], dtype=D), torch.tensor([-9.0], dtype=D), torch.zeros(1, dtype=D),
                       torch.zeros(1, dtype=D), torch.tensor([12]), torch.tensor([6]), s)
    assert build_loss("simpo", beta=10.0, gamma=0.0, dispersion=True)(x).losses.item() == pytest.approx(0.009353,
                                                                                                         abs=5e-7)
    assert build_loss("simpo", beta=10.0, gamma=0.0)(x).losses.item() == pytest.approx(0.006715, abs=5e-7)


def test_kendall_link_vectors():
    for phi in (0.1, 0.3, 0.8):
        assert kendall_link(torch.tensor([1.0], dtype=D), phi).item() == pytest.approx(1 / (1 + phi), abs=1e-14)
    g = kendall_link(torch.tensor([2.0, 3.0], dtype=D), 0.3)
    assert g.tolist() == pytest.approx([0.885445, 0.949417], abs=1e-6)
    assert kendall_link(2.0, torch.tensor(0.8)).item() == pytest.approx(0.591985, abs=1e-6)
    # z = 0 takes the z > 0 limit 1/(1 - phi) - 1/s; phi = 1/2: 2 - 1/log 2 = 0.5573050
    assert kendall_link(0.0, 0.5).item() == pytest.approx(2 - 1 / math.log(2))
    # phi = 1 is clamped to 1 - 1e-6: no information, g = 1/2 (to ~s z / 6)
    assert kendall_link(torch.tensor([-3.0, 0.0, 3.0]), 1.0).tolist() == pytest.approx([0.5] * 3, abs=1e-6)


@pytest.mark.parametrize("n", [4, 5])
@pytest.mark.parametrize("phi", [0.2, 0.5, 0.9])
def test_kendall_link_equals_brute_force(n, phi):
    """P(item a above b) under Mallows-Kendall with central ranking 0..n-1 is g_phi(b - a), whatever n."""
    perms = list(itertools.permutations(range(n)))  # perm[k] = item placed k-th
    inversions = lambda p: sum(p[i] > p[j] for i in range(n) for j in range(i + 1, n))  # noqa: E731
    weights = [phi ** inversions(p) for p in perms]
    total = sum(weights)
    for a, b in itertools.combinations(range(n), 2):
        above = sum(w for w, p in zip(weights, perms) if p.index(a) < p.index(b)) / total
        assert kendall_link(torch.tensor(float(b - a), dtype=D), phi).item() == pytest.approx(above, abs=1e-12)


def test_kendall_link_extension_is_symmetric_and_tails_are_exact():
    z = torch.linspace(-20, 20, 81, dtype=D)
    g = kendall_link(z, 0.4)
    assert torch.allclose(g[z > 0].flip(0), 1 - g[z < 0])
    assert (g > 0).all() and (g < 1).all()
    # far tail, in log space: 1 - g(d) = phi^d (d - (d+1) phi) + O(phi^2d); phi = 1/2, d = 60:
    # -log(2^-60 * 29.5) = 60 log 2 - log 29.5 = 38.2044406 (a float64 1 - g would round to 0, loss inf)
    x = pairwise(-60.0, 0.0, s=math.log(2))
    assert build_loss("mallows_phi", beta=1.0)(x).losses.item() == pytest.approx(60 * math.log(2) - math.log(29.5))


# --- MallowsPO-phi behaviour -------------------------------------------------------------------------------


def test_mallows_phi_gradient_at_zero_and_progress():
    # policy == reference: u = 0 -> z = 0 uses the z > 0 branch. phi = 1/2 (s = log 2), beta = 1:
    # d(-log g)/dz = -g'(0)/g(0), g'(0) = B'(s) - 1/2 with B(x) = x/(1 - e^-x), B'(log 2) = 2 (1 - log 2),
    # g(0) = 2 - 1/log 2 -> -(0.6137056 - 0.5) / 0.5573050 = -0.2040277
    x = pairwise([-5.0] * 3, [-5.0] * 3, [-5.0] * 3, [-5.0] * 3, s=[math.log(2), 0.3, 1e-9], requires_grad=True)
    build_loss("mallows_phi", beta=1.0)(x).losses.sum().backward()
    grad = x.policy_chosen_logps.grad
    assert grad[0].item() == pytest.approx(-0.20402768, abs=1e-8)
    assert torch.isfinite(grad).all() and (grad < 0).all(), grad  # descending the loss raises u, even at phi ~ 1
    assert torch.allclose(x.policy_rejected_logps.grad, -grad)
    # training from u = 0 makes progress
    u = torch.zeros(2, dtype=D, requires_grad=True)
    optimizer = torch.optim.SGD([u], lr=1.0)
    losses = []
    for _ in range(5):
        y = PairwiseInputs(u, torch.zeros(2, dtype=D), torch.zeros(2, dtype=D), torch.zeros(2, dtype=D),
                           torch.ones(2, dtype=D), torch.ones(2, dtype=D), torch.tensor([1.0, 0.3], dtype=D))
        loss = build_loss("mallows_phi", beta=0.5)(y).losses.sum()
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert (u > 0).all()  # the first step already leaves 0 upward
    assert losses[-1] < losses[0]


def test_mallows_phi_extremes_are_finite():
    u = torch.tensor([-500.0, -3.0, 0.0, 3.0, 500.0], dtype=D)
    for dtype in (D, torch.float32):
        for s in (0.0, 1e-9, 1e-4, 1.0, 30.0):
            x = pairwise(u, torch.zeros(5), s=s, requires_grad=True, dtype=dtype)
            out = build_loss("mallows_phi", beta=1.0)(x)
            out.losses.sum().backward()
            assert out.losses.dtype == dtype
            assert torch.isfinite(out.losses).all() and torch.isfinite(x.policy_chosen_logps.grad).all(), (dtype, s)
    flat = build_loss("mallows_phi", beta=1.0)(pairwise(u, torch.zeros(5, dtype=D), s=1e-9)).losses
    # phi -> 1: g -> 1/2; phi is clamped at 1 - 1e-6 (s = 1e-6), where, from C(x) = 1 - x/2 + x^2/12 - ...,
    # g(z) = 1/2 + s (2z + 1) / 12 + O(s^2): -log g moves from log 2 by ~ s z / 3 = 1.7e-4 at |z| = 500
    assert torch.allclose(flat, torch.full_like(flat, math.log(2)), atol=2e-4)
    assert torch.allclose(flat[1:4], torch.full_like(flat[1:4], math.log(2)), atol=1e-5)


# --- gradcheck ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradcheck_every_loss(name):
    torch.manual_seed(0)
    params = {"dispersion": True} if "dispersion" in loss_parameters(name) else {}
    if "length_normalize" in loss_parameters(name):
        params["length_normalize"] = True
    fn = build_loss(name, **params)
    s = torch.rand(3, dtype=D) + 0.2
    if build_loss(name).listwise:
        ref, lengths = torch.randn(3, 4, dtype=D), torch.randint(1, 5, (3, 4)).to(D)
        mask = torch.tensor([[True] * 4, [True, True, False, True], [True, True, True, False]])
        # continuous random scores: pairwise-distinct target values, so the induced ranking is well defined
        lambdas = torch.tensor([[0.3, 0.7]] * 3, dtype=D)
        target = mixed_target(torch.randn(3, 2, 4, dtype=D), lambdas, response_mask=mask)
        f = lambda lp: fn(ListwiseInputs(lp, ref, lengths, target, mask, s)).losses  # noqa: E731
        inputs = (torch.randn(3, 4, dtype=D, requires_grad=True),)
    else:
        rc, rr = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
        nc, nr = torch.tensor([2.0, 3, 4], dtype=D), torch.tensor([1.0, 5, 2], dtype=D)
        f = lambda pc, pr: fn(PairwiseInputs(pc, pr, rc, rr, nc, nr, s)).losses  # noqa: E731
        inputs = (torch.randn(3, dtype=D, requires_grad=True), torch.randn(3, dtype=D, requires_grad=True))
    assert torch.autograd.gradcheck(f, inputs)


def test_gradcheck_mallows_phi_across_dispersion_and_sign():
    # z on both sides of 0 (not at it: the extension jumps there), s from near phi = 1 to phi = 1e-6
    s = torch.tensor([1e-6, 1e-3, 0.05, 1.0, 13.0, 20.0], dtype=D)
    zeros, ones = torch.zeros(6, dtype=D), torch.ones(6, dtype=D)
    fn = build_loss("mallows_phi", beta=1.0)
    f = lambda pc: fn(PairwiseInputs(pc, zeros, zeros, zeros, ones, ones, s)).losses  # noqa: E731
    u = torch.tensor([0.3, 2.0, 7.0, 0.5, 0.2, 40.0], dtype=D)
    for sign in (1.0, -1.0):
        assert torch.autograd.gradcheck(f, ((sign * u).requires_grad_(True),))


# --- dispersion estimator, registry ------------------------------------------------------------------------


def calibrate_scale(hbar) -> float:
    """c = 1 / mean(-log Hbar(x)) of ALGORITHMS 2.3 over one collection, through prepare's streamed estimator."""
    aggregate = EntropyAggregate()
    aggregate.add(hbar)
    return aggregate.scale()


def test_dispersion_estimator():
    hbar = torch.tensor([0.02, 0.1, 0.3, 0.7])
    c = calibrate_scale(hbar)
    assert dispersion_from_entropy(hbar, c).mean().item() == pytest.approx(1.0)
    assert c == pytest.approx(1 / (-torch.log(hbar.double())).mean().item())
    assert calibrate_scale(np.array([math.exp(-2.0)] * 3)) == pytest.approx(0.5)  # numpy input, -log Hbar = 2
    assert prompt_mean_entropy([[0.2, 0.4, 9.0]], [[True, True, False]]).item() == pytest.approx(0.3)
    # clamp: Hbar 0 -> 1e-6 (s = c * 13.8155), Hbar > 1 -> 1 (s = 0)
    assert dispersion_from_entropy([0.0, 1.2], 1.0).tolist() == pytest.approx([-math.log(1e-6), 0.0])
    with pytest.raises(ValueError, match="every Hbar"):
        calibrate_scale([1.0, 1.0])
    with pytest.raises(ValueError, match="empty"):
        calibrate_scale([])
    with pytest.raises(ValueError, match="NaN"):
        calibrate_scale([0.5, float("nan")])


@pytest.mark.parametrize("low, high", [(0.01, 0.9), (0.99, 0.9999)])  # broad, and a near-uniform reference
def test_entropy_aggregate_streams_c_exactly_and_percentiles_within_a_bin(low, high):
    """prepare's streamed form of calibrate_scale: blocks in any order give the c of the whole set; the
    percentiles of -log Hbar come within 0.2% (half a log-spaced bin) of numpy's on 20k values."""
    hbar = np.random.default_rng(3).uniform(low, high, 20_000)
    aggregate = EntropyAggregate()
    for block in np.array_split(hbar[::-1], 7):
        aggregate.add(block)
    assert aggregate.scale() == pytest.approx(calibrate_scale(hbar), rel=1e-12)
    assert aggregate.scale() == pytest.approx(1 / np.mean(-np.log(hbar)), rel=1e-12)
    assert aggregate.hbar_sum / aggregate.count == pytest.approx(hbar.mean(), rel=1e-12)
    qs = [5, 25, 50, 75, 95]
    assert aggregate.neg_log_percentiles(qs) == pytest.approx(np.percentile(-np.log(hbar), qs), rel=2e-3)


def test_registry():
    assert set(PAIRWISE_LOSSES) == {"dpo", "cdpo", "robust", "ipo", "simpo", "mallows_theta", "mallows_phi",
                                    "mallows_simpo", "mallows_ipo", "hinge", "exo_pair", "nca_pair", "bco_pair",
                                    "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
                                    "sigmoid_norm", "nll"}
    assert set(LISTWISE_LOSSES) == {"listwise", "plackett_luce", "listwise_nll", "lambda_contrast"}
    assert set(LOSSES) == set(PAIRWISE_LOSSES) | set(LISTWISE_LOSSES)
    assert RANKING_LOSSES == ["listwise", "plackett_luce"]
    assert loss_parameters("simpo") == {"beta": 2.0, "gamma": 0.5, "dispersion": False}
    f_div = {"f_divergence": "reverse_kl", "f_alpha": 0.5}
    assert loss_parameters("dpo") == {"beta": 0.1, "dispersion": False, **f_div}
    assert loss_parameters("mallows_phi") == {"beta": 0.1, **f_div}
    x = pairwise(0.0, 0.0)
    assert build_loss("dpo", beta=np.float32(1.0))(x).losses.item() == pytest.approx(math.log(2))
    assert build_loss("mallows_phi").reads_dispersion and build_loss("mallows_theta").reads_dispersion
    assert build_loss("ipo", dispersion=True).reads_dispersion and not build_loss("dpo").reads_dispersion
    assert build_loss("plackett_luce").listwise and not build_loss("dpo").listwise


def test_a_loss_object_says_what_it_needs():
    ipo = build_loss("ipo", beta=0.2, dispersion=True)
    assert (ipo.name, ipo.params, ipo.kind) == ("ipo", {"beta": 0.2, "dispersion": True}, "pairwise")
    assert ipo.needs_reference and ipo.reads_dispersion and not (ipo.wpo or ipo.ld or ipo.listwise)
    simpo = build_loss("simpo", ld_alpha=0.5, wpo=True)
    assert not simpo.needs_reference and not simpo.reads_dispersion and simpo.wpo and simpo.ld
    assert not build_loss("dpo", ld_alpha=1.0).ld  # 1 is the plain loss
    mix = build_composite([Term("listwise", 1.0, {"dispersion": True}), Term("listwise_nll", 0.5),
                           Term("lambda_contrast", 0.0)])
    assert mix.name == "listwise+listwise_nll+lambda_contrast" and mix.listwise and mix.reads_dispersion
    assert mix.needs_reference and not mix.across_lambdas  # lambda_contrast switched off by its weight 0
    assert mix.params["listwise_nll"] == {"weight": 0.5, "params": {}}
    assert build_composite([Term("nll"), Term("simpo")]).needs_reference is False


def test_registry_errors_name_the_key():
    with pytest.raises(ValueError, match="unknown loss 'dpoo'; valid losses: dpo, cdpo, robust, ipo, simpo"):
        build_loss("dpoo")
    for call in (loss_parameters, loss_spec):
        with pytest.raises(ValueError, match="unknown loss 'dpoo'"):
            call("dpoo")
    with pytest.raises(ValueError, match="loss 'simpo' has no parameter 'label_smoothing'; valid parameters: beta, "
                                         "gamma, dispersion"):
        build_loss("simpo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="'beta' must be a number"):
        build_loss("dpo", beta="high")
    with pytest.raises(ValueError, match="'dispersion' must be true or false"):
        build_loss("dpo", dispersion=1)


def test_losses_package_imports_no_framework():
    code = ("import sys, mallows_ray.losses; "
            "print([m for m in ('ray', 'deepspeed', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
