"""The loss library against hand-derived numbers, identities, brute force and float64 gradcheck."""

import itertools
import math
import subprocess
import sys

import pytest
import torch

from mallows_ray.losses import (
    LOSSES, ListwiseInputs, PairwiseInputs, build_loss, calibrate_scale, dispersion_from_entropy, is_listwise,
    kendall_link, loss_parameters, mixed_target, prompt_mean_entropy, uses_dispersion,
)

D = torch.float64


def pairwise(pc, pr, rc=0.0, rr=0.0, nc=1.0, nr=1.0, s=None, requires_grad=False):
    t = lambda v: torch.as_tensor(v, dtype=D).reshape(-1)  # noqa: E731
    pc, pr = t(pc).clone().requires_grad_(requires_grad), t(pr).clone().requires_grad_(requires_grad)
    n = pc.shape[0]
    expand = lambda v: t(v).expand(n).clone()  # noqa: E731
    return PairwiseInputs(pc, pr, expand(rc), expand(rr), expand(nc), expand(nr), None if s is None else expand(s))


def logsig(x):
    return -math.log1p(math.exp(-x))


# --- section 1: hand-derived values ------------------------------------------------------------------------


def test_dpo_hand_values():
    # beta = 1, u = 0 -> -logsigmoid(0) = log 2
    assert build_loss("dpo", beta=1.0)(pairwise(0.0, 0.0)).losses.item() == pytest.approx(math.log(2))
    # lp_w=-1, ref_w=-2, lp_l=-3, ref_l=-2: u = 1 - (-1) = 2; beta = 0.5 -> -logsigmoid(1) = 0.3132617
    out = build_loss("dpo", beta=0.5)(pairwise(-1.0, -3.0, -2.0, -2.0))
    assert out.losses.item() == pytest.approx(0.31326169, abs=1e-7)
    assert out.chosen_rewards.item() == pytest.approx(0.5) and out.rejected_rewards.item() == pytest.approx(-0.5)
    assert out.accuracy.item() == 1.0


def test_cdpo_and_robust_hand_values():
    x = pairwise(-1.0, -3.0, -2.0, -2.0)  # u = 2, beta = 0.5 -> z = 1
    eps = 0.2
    cdpo = -(1 - eps) * logsig(1.0) - eps * logsig(-1.0)  # 0.8*0.3132617 + 0.2*1.3132617 = 0.5132617
    robust = (-(1 - eps) * logsig(1.0) + eps * logsig(-1.0)) / (1 - 2 * eps)  # (0.2506093-0.2626523)/0.6
    assert build_loss("cdpo", beta=0.5, label_smoothing=eps)(x).losses.item() == pytest.approx(cdpo)
    assert cdpo == pytest.approx(0.51326169, abs=1e-7)
    assert build_loss("robust", beta=0.5, label_smoothing=eps)(x).losses.item() == pytest.approx(robust)
    assert robust == pytest.approx(-0.02007169, abs=1e-7)
    with pytest.raises(ValueError, match="label_smoothing"):
        build_loss("cdpo", label_smoothing=0.5)(x)


def test_ipo_uses_per_token_means():
    # chosen ratio 4 over 4 tokens = 1, rejected ratio -2 over 2 tokens = -1: u_avg = 2; beta = 0.25 -> 1/(2b) = 2
    x = pairwise(0.0, -2.0, -4.0, 0.0, nc=4.0, nr=2.0)
    assert build_loss("ipo", beta=0.25)(x).losses.item() == pytest.approx(0.0)
    assert build_loss("ipo", beta=0.5)(x).losses.item() == pytest.approx((2 - 1) ** 2)


def test_simpo_hand_value():
    # means -1.0 and -1.5, beta = 2, gamma = 0.5: z = 2*0.5 - 0.5 = 0.5
    x = pairwise(-2.0, -4.5, nc=2.0, nr=3.0)
    assert build_loss("simpo", beta=2.0, gamma=0.5)(x).losses.item() == pytest.approx(-logsig(0.5))


# --- identities --------------------------------------------------------------------------------------------


def test_mallows_theta_with_unit_dispersion_is_dpo_and_cdpo():
    x = pairwise([-1.0, -2.0, 0.3], [-2.0, -1.0, 0.1], [-1.5, -1.2, 0.0], [-1.0, -1.9, 0.2], s=1.0)
    assert torch.allclose(build_loss("mallows_theta", beta=0.3)(x).losses, build_loss("dpo", beta=0.3)(x).losses)
    assert torch.allclose(build_loss("mallows_theta", beta=0.3, label_smoothing=0.1)(x).losses,
                          build_loss("cdpo", beta=0.3, label_smoothing=0.1)(x).losses)


def test_plug_in_scales_the_logit():
    x = pairwise([-1.0], [-2.0], s=2.0)
    z = 0.1 * 1.0
    assert build_loss("dpo", beta=0.1, dispersion=True)(x).losses.item() == pytest.approx(-logsig(2 * z))
    with pytest.raises(ValueError, match="dispersion"):
        build_loss("dpo", dispersion=True)(pairwise(0.0, 0.0))


@pytest.mark.parametrize("loss", ["listwise", "plackett_luce"])
def test_listwise_n2_one_hot_equals_dpo(loss):
    pc, pr, rc, rr = [-1.0, -3.0, 0.5], [-2.0, -1.0, 0.2], [-1.2, -2.0, 0.0], [-1.1, -1.5, 0.4]
    dpo = build_loss("dpo", beta=0.7)(pairwise(pc, pr, rc, rr)).losses
    x = ListwiseInputs(
        policy_logps=torch.tensor([pc, pr], dtype=D).T, reference_logps=torch.tensor([rc, rr], dtype=D).T,
        lengths=torch.ones(3, 2, dtype=D), target=torch.tensor([[1.0, 0.0]] * 3, dtype=D),
    )
    assert torch.allclose(build_loss(loss, beta=0.7)(x).losses, dpo)


def test_listwise_lambda_sum_equals_cross_entropy_against_mixture():
    torch.manual_seed(0)
    scores, lam = torch.randn(4, 3, 5, dtype=D), torch.softmax(torch.randn(4, 3, dtype=D), -1)
    r = torch.randn(4, 5, dtype=D)
    x = ListwiseInputs(r, torch.zeros_like(r), torch.ones_like(r), mixed_target(scores, lam))
    per_objective = [-(torch.softmax(scores[:, k], -1) * torch.log_softmax(r, -1)).sum(-1) for k in range(3)]
    expected = sum(lam[:, k] * per_objective[k] for k in range(3))
    assert torch.allclose(build_loss("listwise", beta=1.0)(x).losses, expected)


def test_plackett_luce_hand_value_and_ties():
    # target order (stable on the tie): 0, 1, 2 ; r = [1, 0, 2] -> terms log(e^1/(e^1+e^0+e^2)) + log(e^0/(e^0+e^2))
    r = torch.tensor([[1.0, 0.0, 2.0]], dtype=D)
    x = ListwiseInputs(r, torch.zeros_like(r), torch.ones_like(r), torch.tensor([[0.4, 0.4, 0.2]], dtype=D))
    expected = -(1 - math.log(math.e + 1 + math.e**2)) - (0 - math.log(1 + math.e**2))
    assert build_loss("plackett_luce", beta=1.0)(x).losses.item() == pytest.approx(expected)


@pytest.mark.parametrize("loss", ["listwise", "plackett_luce"])
def test_listwise_padding_is_inert(loss):
    torch.manual_seed(1)
    r = torch.randn(2, 3, dtype=D)
    scores = torch.randn(2, 1, 3, dtype=D)
    target = mixed_target(scores, torch.ones(2, 1, dtype=D))
    base = build_loss(loss, beta=1.0)(ListwiseInputs(r, torch.zeros_like(r), torch.ones_like(r), target)).losses
    # append a padding response with wild values: loss and gradients must not notice it
    padded_r = torch.cat([r, torch.full((2, 1), 50.0, dtype=D)], dim=1).requires_grad_(True)
    mask = torch.tensor([[True, True, True, False]] * 2)
    padded_target = mixed_target(torch.cat([scores, torch.full((2, 1, 1), 9.0, dtype=D)], -1),
                                 torch.ones(2, 1, dtype=D), response_mask=mask)
    assert padded_target[:, 3].abs().max() == 0
    out = build_loss(loss, beta=1.0)(ListwiseInputs(padded_r, torch.zeros_like(padded_r), torch.ones_like(padded_r),
                                                    padded_target, response_mask=mask))
    assert torch.allclose(out.losses, base)
    out.losses.sum().backward()
    assert padded_r.grad[:, 3].abs().max() == 0 and torch.isfinite(padded_r.grad).all()


# --- section 4 test vectors --------------------------------------------------------------------------------


def test_mallows_simpo_vector():
    hbar = prompt_mean_entropy(torch.tensor([[0.03, 0.05]], dtype=D))
    s = dispersion_from_entropy(hbar, 0.29)
    assert s.item() == pytest.approx(0.93347, abs=1e-5)
    x = pairwise(-1.0, -1.5, s=s.item())  # per-token means with n = 1, reference-free
    assert build_loss("simpo", beta=10.0, gamma=0.0, dispersion=True)(x).losses.item() == pytest.approx(0.009353, abs=1e-6)
    assert build_loss("simpo", beta=10.0, gamma=0.0)(x).losses.item() == pytest.approx(0.006715, abs=1e-6)


def test_kendall_link_vectors():
    for phi in (0.1, 0.3, 0.8):
        assert kendall_link(torch.tensor([1.0], dtype=D), torch.tensor(phi)).item() == pytest.approx(1 / (1 + phi))
    g = kendall_link(torch.tensor([2.0, 3.0], dtype=D), torch.tensor(0.3))
    assert g.tolist() == pytest.approx([0.885445, 0.949417], abs=1e-6)
    assert kendall_link(torch.tensor([2.0], dtype=D), torch.tensor(0.8)).item() == pytest.approx(0.591985, abs=1e-6)


@pytest.mark.parametrize("n", [4, 5])
@pytest.mark.parametrize("phi", [0.2, 0.5, 0.9])
def test_kendall_link_equals_brute_force(n, phi):
    """P(item a ranked above b) under Mallows-Kendall, central ranking 0..n-1, equals g_phi(b - a)."""
    perms = list(itertools.permutations(range(n)))
    inversions = lambda p: sum(p[i] > p[j] for i in range(n) for j in range(i + 1, n))  # noqa: E731
    weights = torch.tensor([phi ** inversions(p) for p in perms], dtype=D)
    weights /= weights.sum()
    for a, b in itertools.combinations(range(n), 2):
        above = sum(w for w, p in zip(weights, perms) if p.index(a) < p.index(b))
        assert kendall_link(torch.tensor([float(b - a)], dtype=D), torch.tensor(phi, dtype=D)).item() == pytest.approx(
            float(above), abs=1e-12)


def test_kendall_link_extension_is_symmetric_and_bounded():
    z = torch.linspace(-20, 20, 81, dtype=D)
    g = kendall_link(z, torch.tensor(0.4))
    positive = z > 0
    assert torch.allclose(g[positive].flip(0), 1 - g[z < 0])
    assert (g > 0).all() and (g < 1).all()


# --- MallowsPO-phi behaviour -------------------------------------------------------------------------------


def test_mallows_phi_gradient_at_zero_and_progress():
    x = pairwise([-5.0, -5.0], [-5.0, -5.0], [-5.0, -5.0], [-5.0, -5.0], s=[1.0, 0.3], requires_grad=True)
    out = build_loss("mallows_phi", beta=0.5)(x)
    out.losses.sum().backward()
    grad = x.policy_chosen_logps.grad
    assert torch.isfinite(grad).all() and (grad < 0).all(), grad  # descending the loss raises u from 0
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
    assert (u > 0).all() and losses[-1] < losses[0]


def test_mallows_phi_extremes_are_finite():
    u = torch.tensor([-500.0, -3.0, 0.0, 3.0, 500.0], dtype=D)
    for s in (1e-9, 1e-4, 1.0, 30.0):
        x = pairwise(u, torch.zeros(5, dtype=D), s=s, requires_grad=True)
        out = build_loss("mallows_phi", beta=1.0)(x)
        out.losses.sum().backward()
        assert torch.isfinite(out.losses).all() and torch.isfinite(x.policy_chosen_logps.grad).all(), s
    flat = build_loss("mallows_phi", beta=1.0)(pairwise(u, torch.zeros(5, dtype=D), s=1e-9)).losses
    # phi -> 1: g -> 1/2; phi is clamped at 1 - 1e-6, where g - 1/2 ~ s z / 12 ~ 4e-5 at z = 500
    assert torch.allclose(flat, torch.full_like(flat, math.log(2)), atol=1e-3)
    assert torch.allclose(flat[1:4], torch.full_like(flat[1:4], math.log(2)), atol=1e-5)


# --- gradcheck ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradcheck_every_loss(name):
    torch.manual_seed(0)
    params = {"dispersion": True} if "dispersion" in loss_parameters(name) else {}
    fn = build_loss(name, **params)
    s = torch.rand(3, dtype=D) + 0.2
    if is_listwise(name):
        ref, lengths = torch.randn(3, 4, dtype=D), torch.randint(1, 5, (3, 4)).to(D)
        target = mixed_target(torch.randn(3, 2, 4, dtype=D), torch.tensor([[0.3, 0.7]] * 3, dtype=D))
        # pairwise-distinct target values so the induced ranking does not flip under gradcheck's perturbation
        f = lambda lp: fn(ListwiseInputs(lp, ref, lengths, target, dispersion=s)).losses  # noqa: E731
        inputs = (torch.randn(3, 4, dtype=D, requires_grad=True),)
    else:
        rc, rr, nc, nr = torch.randn(3, dtype=D), torch.randn(3, dtype=D), torch.tensor([2.0, 3, 4], dtype=D), \
            torch.tensor([1.0, 5, 2], dtype=D)
        f = lambda pc, pr: fn(PairwiseInputs(pc, pr, rc, rr, nc, nr, s)).losses  # noqa: E731
        inputs = (torch.randn(3, dtype=D, requires_grad=True), torch.randn(3, dtype=D, requires_grad=True))
    assert torch.autograd.gradcheck(f, inputs)


# --- dispersion estimator, registry ------------------------------------------------------------------------


def test_calibrated_scale_gives_unit_mean_dispersion():
    hbar = torch.tensor([0.02, 0.1, 0.3, 0.7])
    c = calibrate_scale(hbar)
    assert dispersion_from_entropy(hbar, c).mean().item() == pytest.approx(1.0)
    assert c == pytest.approx(1 / (-torch.log(hbar.double())).mean().item())
    assert prompt_mean_entropy([[0.2, 0.4, 9.0]], [[True, True, False]]).item() == pytest.approx(0.3)
    with pytest.raises(ValueError, match="every Hbar"):
        calibrate_scale([1.0, 1.0])
    with pytest.raises(ValueError, match="empty"):
        calibrate_scale([])


def test_registry_errors_name_the_key():
    with pytest.raises(ValueError, match="unknown loss 'dpoo'; valid losses: dpo, cdpo"):
        build_loss("dpoo")
    with pytest.raises(ValueError, match="loss 'simpo' has no parameter 'label_smoothing'; valid parameters: beta, gamma"):
        build_loss("simpo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="'beta' must be a number"):
        build_loss("dpo", beta="high")
    assert uses_dispersion("mallows_phi", {}) and uses_dispersion("ipo", {"dispersion": True})
    assert not uses_dispersion("dpo", {}) and is_listwise("plackett_luce") and not is_listwise("dpo")


def test_losses_package_imports_no_framework():
    code = "import sys, mallows_ray.losses; print([m for m in ('ray', 'deepspeed', 'transformers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
