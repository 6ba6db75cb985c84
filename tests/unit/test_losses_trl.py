"""The TRL 1.16 loss types, f-divergences, nll, the composite and the MallowsPO authors' conventions: hand
arithmetic, identities, float64 gradcheck, and agreement with TRL's formulas transcribed from
trl/trainer/dpo_trainer.py (`DPOTrainer._compute_loss`, 1.16.0) as an always-on reference (TRL is not a test
dependency; test_losses_trl_direct.py runs TRL's own code where it is installed)."""

import math

import pytest
import torch
import torch.nn.functional as F

from mallows_ray.losses import (
    F_DIVERGENCES,
    SPECS,
    PairwiseInputs,
    Term,
    build_composite,
    build_loss,
    check_parameters,
    loss_parameters,
    term_labels,
)
from mallows_ray.losses.mallows import _log_kendall_link

D = torch.float64
NEW = ["hinge", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down",
       "discopop", "sigmoid_norm"]
F_DIV_LOSSES = [n for n in SPECS if "f_divergence" in loss_parameters(n)]
DISPERSION_OPTION = [n for n, s in SPECS.items() if s.dispersion == "option"]


def ls(x):
    """logsigmoid(x) by hand."""
    return -math.log1p(math.exp(-x))


def sig(x):
    return 1 / (1 + math.exp(-x))


def pairs(pc, pr, rc, rr, nc=1.0, nr=1.0, s=None):
    t = lambda v: torch.as_tensor(v, dtype=D).reshape(-1)  # noqa: E731
    pc = t(pc)
    e = lambda v: t(v).expand(pc.shape[0]).clone()  # noqa: E731
    return PairwiseInputs(pc, e(pr), e(rc), e(rr), e(nc), e(nr), None if s is None else e(s))


# one pair: cl = -1 - (-1.5) = 0.5, rl = -2 - (-1.5) = -0.5, d = cl - rl = 1
ONE = dict(pc=-1.0, pr=-2.0, rc=-1.5, rr=-1.5)


def value(name, x=None, **params):
    return build_loss(name, **params)(pairs(**ONE) if x is None else x).losses.tolist()


# --- hand arithmetic ---------------------------------------------------------------------------------------


def test_hand_values_of_single_pair_losses():
    # beta = 0.5: z = 0.5 * d = 0.5, beta cl = 0.25, beta rl = -0.25
    assert value("hinge", beta=0.5) == pytest.approx([1 - 0.5])
    assert value("hinge", beta=2.0) == [0.0]  # relu(1 - 2) = 0
    q, eps = sig(0.5), 0.1
    assert value("exo_pair", beta=0.5, label_smoothing=eps) == pytest.approx(
        [q * (ls(0.5) - math.log(0.9)) + (1 - q) * (ls(-0.5) - math.log(0.1))])
    assert value("nca_pair", beta=0.5) == pytest.approx([-ls(0.25) - 0.5 * ls(-0.25) - 0.5 * ls(0.25)])
    assert value("bco_pair", beta=0.5) == pytest.approx([-ls(0.25) - ls(0.25)])
    # sppo_hard, beta = 0.25: 1/(2 beta) = 2: (0.5 - 2)^2 + (-0.5 + 2)^2 = 2.25 + 2.25
    assert value("sppo_hard", beta=0.25) == pytest.approx([4.5])
    assert value("sppo_hard", beta=1.0) == pytest.approx([0.0])  # cl = 1/(2 beta), rl = -1/(2 beta)
    assert value("apo_zero", beta=0.5) == pytest.approx([1 - sig(0.25) + sig(-0.25)])
    assert value("apo_down", beta=0.5) == pytest.approx([sig(0.25) + 1 - sig(0.5)])
    m = sig(0.5 / 0.05)  # z / tau = 10
    assert value("discopop", beta=0.5) == pytest.approx([-ls(0.5) * (1 - m) + math.exp(-0.5) * m])
    # sigmoid_norm with n(y_w) = 2, n(y_l) = 4: 0.5/2 - (-0.5)/4 = 0.375, times beta 2 = 0.75
    x = pairs(**ONE, nc=2.0, nr=4.0)
    assert value("sigmoid_norm", x, beta=2.0) == pytest.approx([-ls(0.75)])
    # rewards: beta (lp - ref); accuracy chosen > rejected
    out = build_loss("nca_pair", beta=0.5)(pairs(**ONE))
    assert out.chosen_rewards.tolist() == [0.25] and out.rejected_rewards.tolist() == [-0.25]
    assert out.accuracy.tolist() == [1.0]


def test_hand_values_of_batch_level_aot():
    # lp_w - lp_l = [0 - (-1), -3 - (-1)] = [1, -2] -> sorted [-2, 1]; ref_w - ref_l = [-1, 2] -> [-1, 2]
    x = pairs([0.0, -3.0], [-1.0, -1.0], [-1.0, 0.0], [0.0, -2.0])
    # sorted differences: [-2 - (-1), 1 - 2] = [-1, -1]; paired (dpo) they would be [2, -4]
    assert value("aot", x, beta=0.5) == pytest.approx([-ls(-0.5), -ls(-0.5)])
    assert value("aot", x, beta=0.5, label_smoothing=0.2) == pytest.approx([-0.8 * ls(-0.5) - 0.2 * ls(0.5)] * 2)
    # cl = [1, -3], rl = [-1, 1] -> sorted [-3, 1] - [-1, 1] = [-2, 0]
    assert value("aot_unpaired", x, beta=0.5) == pytest.approx([-ls(-1.0), math.log(2)])


def test_hand_values_of_nll():
    x = pairs([-3.0, -8.0], [-1.0, -1.0], 0.0, 0.0, nc=[2.0, 4.0], nr=[1.0, 1.0])
    assert value("nll", x) == pytest.approx([1.5, 2.0])                   # mean: 3/2, 8/4
    assert value("nll", x, reduction="sum") == pytest.approx([3.0, 8.0])
    token = value("nll", x, reduction="token")                           # lp * B / sum n = lp * 2 / 6
    assert token == pytest.approx([1.0, 8 / 3]) and sum(token) / 2 == pytest.approx(11 / 6)  # TRL sft: 11 / 6
    out = build_loss("nll")(x)  # rewards: per-token mean log-probs; the policy prefers the rejected replies here
    assert out.chosen_rewards.tolist() == [-1.5, -2.0] and out.accuracy.tolist() == [0.0, 0.0]


def test_hand_values_of_f_divergences():
    # cl = 0.5, rl = -0.5, beta = 1, dpo: -logsigmoid(f(cl) - f(rl))
    a = math.exp(0.5)
    cases = {"reverse_kl": 1.0, "forward_kl": (1 - 1 / a) - (1 - a),
             "js_divergence": ls(0.5) - ls(-0.5),  # the log 2 cancels
             "alpha_divergence": ((a ** -0.5 - 1) - (a ** 0.5 - 1)) / -0.5}  # alpha = 0.5: (e^{-x/2} - 1)/(-1/2)
    for kind, delta in cases.items():
        assert value("dpo", beta=1.0, f_divergence=kind) == pytest.approx([-ls(delta)]), kind
    # alpha = 2: (e^x - 1) / 1 ; the clamp at (alpha - 1) x = 80 keeps exp finite
    assert value("hinge", beta=1.0, f_divergence="alpha_divergence", f_alpha=2.0) == pytest.approx(
        [max(0.0, 1 - ((a - 1) - (1 / a - 1)))])
    big = pairs(100.0, 0.0, 0.0, 0.0)
    assert math.isfinite(value("dpo", big, f_divergence="alpha_divergence", f_alpha=2.0)[0])


def test_hand_values_of_the_authors_mallows_conventions():
    # per-token means -12/12 = -1 and -9/6 = -1.5 (reference-free); beta 10, home_advantage 0.3 -> gamma 3
    x = PairwiseInputs(*(torch.tensor([v], dtype=D) for v in (-12.0, -9.0, 0.0, 0.0, 12.0, 6.0, 0.5)))
    # s (beta (mean_w - mean_l) - gamma) = 0.5 (10 * 0.5 - 3) = 1
    assert value("mallows_simpo", x, beta=10.0, home_advantage=0.3) == pytest.approx([-ls(1.0)])
    # u_avg = (-12 - 0)/12 - (-9 - 0)/6 = 0.5; authors: (s u - 1/(2 beta))^2 = (0.25 - 1)^2 with beta 0.5
    assert value("mallows_ipo", x, beta=0.5) == pytest.approx([0.5625])
    # the project's plug-in: (s (u - 1/(2 beta)))^2 = (0.5 * (0.5 - 1))^2
    assert value("ipo", x, beta=0.5, dispersion=True) == pytest.approx([0.0625])


# --- identities --------------------------------------------------------------------------------------------


def _random_pairs(b=6, seed=0, s=None, dtype=D):
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(b, generator=g, dtype=dtype)  # noqa: E731
    n = lambda: torch.randint(1, 9, (b,), generator=g).to(dtype)  # noqa: E731
    return PairwiseInputs(r() - 3, r() - 3, r() - 3, r() - 3, n(), n(), s)


@pytest.mark.parametrize("name", [n for n, spec in SPECS.items() if spec.kind == "pairwise"])
def test_single_term_of_weight_one_is_the_plain_loss(name):
    x = _random_pairs(s=torch.rand(6, dtype=D) + 0.5)
    plain, single = build_loss(name)(x), build_composite([Term(name)])(x)
    assert torch.equal(single.losses, plain.losses) and torch.equal(single.accuracy, plain.accuracy)
    assert torch.equal(single.chosen_rewards, plain.chosen_rewards) and list(single.terms) == [name]


@pytest.mark.parametrize("name", [n for n in DISPERSION_OPTION if SPECS[n].kind == "pairwise"])
def test_dispersion_of_one_is_no_dispersion(name):
    x = _random_pairs(s=torch.ones(6, dtype=D))
    assert torch.allclose(build_loss(name, dispersion=True)(x).losses, build_loss(name)(x).losses, rtol=0, atol=0)
    half = _random_pairs(s=torch.full((6,), 0.5, dtype=D))
    assert not torch.allclose(build_loss(name, dispersion=True)(half).losses, build_loss(name)(half).losses)


def test_identities_between_losses():
    x = _random_pairs()
    same = lambda a, b: torch.testing.assert_close(a.losses, b.losses, rtol=1e-12, atol=1e-12)  # noqa: E731
    for name in ("aot", "aot_unpaired"):  # a batch of one sorts nothing: DPO (cDPO with label smoothing)
        one = PairwiseInputs(*(t[:1] for t in (x.policy_chosen_logps, x.policy_rejected_logps,
                                               x.reference_chosen_logps, x.reference_rejected_logps,
                                               x.chosen_lengths, x.rejected_lengths)))
        same(build_loss(name, beta=0.3, label_smoothing=0.1)(one),
             build_loss("cdpo", beta=0.3, label_smoothing=0.1)(one))
    unit = PairwiseInputs(*(x.policy_chosen_logps, x.policy_rejected_logps, x.reference_chosen_logps,
                            x.reference_rejected_logps, torch.ones(6, dtype=D), torch.ones(6, dtype=D)))
    same(build_loss("sigmoid_norm", beta=0.3)(unit), build_loss("dpo", beta=0.3)(unit))
    same(build_loss("nll")(unit), build_loss("nll", reduction="sum")(unit))
    s1 = PairwiseInputs(*(unit.policy_chosen_logps, unit.policy_rejected_logps, unit.reference_chosen_logps,
                          unit.reference_rejected_logps, x.chosen_lengths, x.rejected_lengths, torch.ones(6, dtype=D)))
    same(build_loss("mallows_simpo", beta=4.0, home_advantage=0.25)(s1), build_loss("simpo", beta=4.0, gamma=1.0)(s1))
    same(build_loss("mallows_ipo", beta=0.2)(s1), build_loss("ipo", beta=0.2)(s1))
    for name in F_DIV_LOSSES:  # alpha -> 1 is reverse KL; alpha = 0 is forward KL: (e^{-x} - 1) / (-1)
        p = {"dispersion": True} if "dispersion" in loss_parameters(name) else {}
        x1 = s1 if "dispersion" not in p else PairwiseInputs(*(list(s1.__dict__.values())[:6]), torch.rand(6, dtype=D))
        same(build_loss(name, **p, f_divergence="alpha_divergence", f_alpha=1.0)(x1), build_loss(name, **p)(x1))
        same(build_loss(name, **p, f_divergence="alpha_divergence", f_alpha=0.0)(x1),
             build_loss(name, **p, f_divergence="forward_kl")(x1))


def test_composite_is_the_weighted_sum_and_reports_each_term():
    x = _random_pairs()
    terms = [Term("dpo", 1.0, {"beta": 0.2}), Term("nll", 0.3), Term("dpo", 0.5, {"beta": 1.0})]
    out = build_composite(terms)(x)
    dpo02, nll, dpo1 = build_loss("dpo", beta=0.2)(x), build_loss("nll")(x), build_loss("dpo", beta=1.0)(x)
    torch.testing.assert_close(out.losses, dpo02.losses + 0.3 * nll.losses + 0.5 * dpo1.losses)
    assert term_labels(terms) == ["dpo.0", "nll", "dpo.2"] and list(out.terms) == ["dpo.0", "nll", "dpo.2"]
    assert torch.equal(out.terms["nll"], nll.losses) and not out.terms["nll"].requires_grad
    assert torch.equal(out.chosen_rewards, dpo02.chosen_rewards)  # the lead term: the first other than nll
    lead_after_nll = build_composite([Term("nll"), Term("bco_pair", params={"beta": 0.7})])(x)
    assert torch.equal(lead_after_nll.chosen_rewards, build_loss("bco_pair", beta=0.7)(x).chosen_rewards)
    # TRL's MPO mix (sigmoid, bco_pair, sft with weights 0.8, 0.2, 1.0): sum_k w_k mean_B(loss_k)
    mpo = build_composite([Term("dpo", 0.8), Term("bco_pair", 0.2), Term("nll", 1.0, {"reduction": "token"})])(x)
    want = (0.8 * build_loss("dpo")(x).losses.mean() + 0.2 * build_loss("bco_pair")(x).losses.mean()
            - x.policy_chosen_logps.sum() / x.chosen_lengths.sum())
    torch.testing.assert_close(mpo.losses.mean(), want)
    with pytest.raises(ValueError, match="mix pairwise and listwise"):
        build_composite([Term("dpo"), Term("listwise")])
    with pytest.raises(ValueError, match="empty"):
        build_composite([])


# --- gradcheck ---------------------------------------------------------------------------------------------


def _gradcheck(fn, s=None, b=4):
    g = torch.Generator().manual_seed(1)
    rc, rr = torch.randn(b, generator=g, dtype=D), torch.randn(b, generator=g, dtype=D)
    nc, nr = torch.tensor([2.0, 3, 4, 1], dtype=D), torch.tensor([1.0, 5, 2, 3], dtype=D)
    f = lambda pc, pr: fn(PairwiseInputs(pc, pr, rc, rr, nc, nr, s)).losses  # noqa: E731
    inputs = tuple(torch.randn(b, generator=g, dtype=D).requires_grad_() for _ in range(2))
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("name", F_DIV_LOSSES)
@pytest.mark.parametrize("kind", F_DIVERGENCES[1:])
def test_gradcheck_f_divergences(name, kind):
    _gradcheck(build_loss(name, f_divergence=kind, f_alpha=0.3), s=torch.rand(4, dtype=D) + 0.2)


def test_gradcheck_composite_and_nll():
    for reduction in ("mean", "sum", "token"):
        _gradcheck(build_loss("nll", reduction=reduction))
    _gradcheck(build_composite([Term("dpo", 0.7, {"dispersion": True}), Term("nll", 0.2), Term("aot", 0.1),
                                Term("discopop", 1.0, {"f_divergence": "js_divergence"})]),
               s=torch.rand(4, dtype=D) + 0.2)


# --- TRL's formulas, transcribed from DPOTrainer._compute_loss (trl 1.16.0) --------------------------------


def trl_reference(loss_type, x, beta, label_smoothing=0.0, f_divergence_type="reverse_kl", f_alpha=0.5, tau=0.05):
    """TRL's per_sequence_loss of one loss_type, line for line (the sft branch as its batch mean)."""
    chosen_logps, rejected_logps = x.policy_chosen_logps, x.policy_rejected_logps
    ref_chosen_logps, ref_rejected_logps = x.reference_chosen_logps, x.reference_rejected_logps
    chosen_len, rejected_len = x.chosen_lengths, x.rejected_lengths  # completion_mask.sum(dim=1)
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    if f_divergence_type == "reverse_kl":
        chosen_scores, rejected_scores = chosen_logratios, rejected_logratios
    elif f_divergence_type == "forward_kl":
        chosen_scores, rejected_scores = 1 - torch.exp(-chosen_logratios), 1 - torch.exp(-rejected_logratios)
    elif f_divergence_type == "js_divergence":
        chosen_scores = math.log(2) + F.logsigmoid(chosen_logratios)
        rejected_scores = math.log(2) + F.logsigmoid(rejected_logratios)
    else:
        coef = 1.0 / (f_alpha - 1.0)
        chosen_scores = (torch.exp(torch.clamp((f_alpha - 1.0) * chosen_logratios, max=80.0)) - 1.0) * coef
        rejected_scores = (torch.exp(torch.clamp((f_alpha - 1.0) * rejected_logratios, max=80.0)) - 1.0) * coef
    delta_score = chosen_scores - rejected_scores
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta_score)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta_score)
    if loss_type == "ipo":
        ipo_delta = chosen_scores / chosen_len.clamp(min=1.0) - rejected_scores / rejected_len.clamp(min=1.0)
        return (ipo_delta - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        epsilon = torch.tensor(label_smoothing, dtype=D)
        qw, log_qw = torch.sigmoid(beta * delta_score), F.logsigmoid(beta * delta_score)
        ql, log_ql = torch.sigmoid(-beta * delta_score), F.logsigmoid(-beta * delta_score)
        return qw * (log_qw - torch.log1p(-epsilon)) + ql * (log_ql - torch.log(epsilon))
    if loss_type == "nca_pair":
        chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
        return (-F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards)
                - 0.5 * F.logsigmoid(-rejected_rewards))
    if loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta_score)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta_score)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    if loss_type == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            delta = (torch.sort(chosen_logps - rejected_logps, dim=0)[0]
                     - torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)[0])
        else:
            delta = torch.sort(chosen_logratios, dim=0)[0] - torch.sort(rejected_logratios, dim=0)[0]
        return -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
    if loss_type == "apo_down":
        return (torch.sigmoid(beta * chosen_logratios) + 1
                - torch.sigmoid(beta * (chosen_logratios - rejected_logratios)))
    if loss_type == "discopop":
        logits = delta_score * beta
        modulation = torch.sigmoid(logits / tau)
        return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
    if loss_type == "sft":
        return (-chosen_logps.sum() / chosen_len.sum()).expand(chosen_logps.shape[0])
    if loss_type == "sigmoid_norm":
        delta = chosen_scores / chosen_len.clamp(min=1.0) - rejected_scores / rejected_len.clamp(min=1.0)
        return -F.logsigmoid(beta * delta)
    raise AssertionError(loss_type)


# TRL loss_type -> (our name, our extra parameters)
TRL_NAMES = {"sigmoid": ("dpo", {}), "hinge": ("hinge", {}), "ipo": ("ipo", {}),
             "exo_pair": ("exo_pair", {"label_smoothing": 0.01}), "nca_pair": ("nca_pair", {}),
             "robust": ("robust", {"label_smoothing": 0.2}), "bco_pair": ("bco_pair", {}),
             "sppo_hard": ("sppo_hard", {}), "aot": ("aot", {"label_smoothing": 0.1}),
             "aot_unpaired": ("aot_unpaired", {"label_smoothing": 0.1}), "apo_zero": ("apo_zero", {}),
             "apo_down": ("apo_down", {}), "discopop": ("discopop", {"tau": 0.05}),
             "sft": ("nll", {"reduction": "token"}), "sigmoid_norm": ("sigmoid_norm", {})}
TRL_F_DIVERGENCE = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop"}


@pytest.mark.parametrize("loss_type", list(TRL_NAMES))
def test_every_loss_agrees_with_trls_formula(loss_type):
    name, params = TRL_NAMES[loss_type]
    kinds = F_DIVERGENCES if loss_type in TRL_F_DIVERGENCE else ("reverse_kl",)
    for seed, beta in ((0, 0.1), (1, 0.5), (2, 2.0)):
        x = _random_pairs(b=16, seed=seed)
        for kind in kinds:
            extra = {} if kind == "reverse_kl" else {"f_divergence": kind, "f_alpha": 0.3}
            ours = build_loss(name, **({} if name == "nll" else {"beta": beta}), **params, **extra)(x).losses
            theirs = trl_reference(loss_type, x, beta, params.get("label_smoothing", 0.0), kind, 0.3)
            if loss_type == "sft":  # batch-level in TRL: compare the batch means, as the trainer uses them
                ours, theirs = ours.mean(), theirs.mean()
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6, msg=f"{loss_type} {kind} beta={beta}")


def test_multi_loss_agrees_with_trls_weighted_sum():
    x = _random_pairs(b=16, seed=3)
    want = sum(w * trl_reference(t, x, 0.1).mean() for t, w in (("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)))
    ours = build_composite([Term("dpo", 0.8, {"beta": 0.1}), Term("bco_pair", 0.2, {"beta": 0.1}),
                            Term("nll", 1.0, {"reduction": "token"})])(x).losses.mean()
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-6)


# --- parameter checks (the config errors reuse these messages) ---------------------------------------------


@pytest.mark.parametrize("name, params, needle", [
    ("dpo", {"beta": 0.0}, "'beta': 0.0 is out of range; expected a finite value in (0, inf)"),
    ("hinge", {"beta": float("nan")}, "'beta': nan is out of range"),
    ("cdpo", {"label_smoothing": 0.5}, "'label_smoothing': 0.5 is out of range; expected a finite value in [0, 0.5)"),
    ("aot", {"label_smoothing": -0.1}, "label_smoothing"),
    ("exo_pair", {"label_smoothing": 0.0}, "'label_smoothing': 0.0 is out of range; expected a finite value in (0, 1)"),
    ("discopop", {"tau": 0.0}, "'tau'"),
    ("simpo", {"gamma": -1.0}, "'gamma'"),
    ("mallows_simpo", {"home_advantage": -0.5}, "'home_advantage'"),
    ("dpo", {"f_divergence": "kl"}, "'kl' is not one of reverse_kl, forward_kl, js_divergence, alpha_divergence"),
    ("dpo", {"f_divergence": 1}, "'f_divergence' must be a string"),
    ("nll", {"reduction": "avg"}, "'avg' is not one of mean, sum, token"),
    ("bco_pair", {"dispersion": True}, "takes no 'dispersion' parameter: the dispersion plug-in has no meaning"),
    ("aot", {"dispersion": False}, "sorted over different prompts"),
    ("mallows_phi", {"dispersion": True}, "it always reads s(x)"),
    ("nca_pair", {"f_divergence": "forward_kl"}, "has no parameter 'f_divergence'"),
])
def test_parameter_checks_name_the_parameter(name, params, needle):
    with pytest.raises(ValueError) as err:
        check_parameters(name, params)
    assert needle in str(err.value) and f"loss {name!r}" in str(err.value)


def test_exo_pair_accepts_small_label_smoothing_and_robust_its_range():
    check_parameters("exo_pair", {"label_smoothing": 1e-3})
    check_parameters("robust", {"label_smoothing": 0.0, "beta": 5})


# --- mallows_phi near phi -> 1 -----------------------------------------------------------------------------


def test_mallows_phi_link_is_accurate_near_phi_one():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50

    def exact(z, s):  # -log g(z), g(d) = (B(s(d+1)) - B(sd)) / s with B(x) = x / (1 - e^-x); 1 - g(-z) for z < 0
        z, s = mpmath.mpf(z), mpmath.mpf(s)
        b = lambda v: v / (1 - mpmath.exp(-v))  # noqa: E731
        g = (b(s * (abs(z) + 1)) - b(s * abs(z))) / s
        return -mpmath.log(g if z >= 0 else 1 - g)

    for s in (1e-6, 1e-5):
        for z in (0.3, 2.0, -1.5, 7.0):
            ours = -_log_kendall_link(torch.tensor([z], dtype=D), torch.tensor([s], dtype=D)).item()
            want = exact(z, s)
            # the information is in loss - log 2 ~ s z / 3; log1p(-exp(x)) got it to ~1e-5 relative, here ~1e-9
            assert abs(float((ours - want) / (want - mpmath.log(2)))) < 1e-7, (s, z)


def test_listwise_terms_compose_too():
    from mallows_ray.losses import ListwiseInputs, mixed_target

    g = torch.Generator().manual_seed(4)
    lp, ref = torch.randn(3, 4, generator=g, dtype=D), torch.randn(3, 4, generator=g, dtype=D)
    mask = torch.tensor([[True] * 4, [True, True, False, True], [True, True, True, False]])
    target = mixed_target(torch.randn(3, 2, 4, generator=g, dtype=D), torch.full((3, 2), 0.5, dtype=D),
                          response_mask=mask)
    x = ListwiseInputs(lp, ref, torch.ones(3, 4, dtype=D), target, mask)
    out = build_composite([Term("listwise", 0.7), Term("plackett_luce", 0.3, {"beta": 0.5})])(x)
    lw, pl = build_loss("listwise")(x), build_loss("plackett_luce", beta=0.5)(x)
    torch.testing.assert_close(out.losses, 0.7 * lw.losses + 0.3 * pl.losses)
    assert torch.equal(out.pair_accuracy, lw.pair_accuracy) and set(out.terms) == {"listwise", "plackett_luce"}
