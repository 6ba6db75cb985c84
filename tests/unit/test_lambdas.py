"""Lambda rendering, CLI parsing, candidate sets and the lambda scheduler (ALGORITHMS.md sections 3.1, 3.2)."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from mallows_ray.lambdas.schedulers import (
    DirichletScheduler,
    FixedScheduler,
    LearnedScheduler,
    TableScheduler,
    build_scheduler,
    default_candidates,
    scheduler_parameters,
)
from mallows_ray.lambdas.vectors import (
    LAMBDA_PREFIX,
    condition_messages,
    format_lambda,
    lambda_vector,
    parse_lambda_arg,
)
from mallows_ray.losses.listwise import listwise
from mallows_ray.losses.types import ListwiseInputs

OBJ = ["helpfulness", "honesty", "instruction_following", "truthfulness"]
LINE = "Preference weights: helpfulness=0.50, honesty=0.20, instruction_following=0.20, truthfulness=0.10"
LAM = {"helpfulness": 0.5, "honesty": 0.2, "instruction_following": 0.2, "truthfulness": 0.1}

# 0.999 quantiles of the chi-square distribution (scipy.stats.chi2.ppf(0.999, df))
CHI2_999 = {3: 16.266, 15: 37.697}


def chi_square(indices: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic of sampled category indices against the expected probabilities."""
    observed = torch.bincount(indices, minlength=len(probs)).double()
    expected = probs.double() * len(indices)
    return ((observed - expected) ** 2 / expected).sum().item()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def parse_lambda_text(text: str) -> dict[str, float]:
    """Inverse of `format_lambda` (a test utility: the package only renders): the rendered line ->
    {objective: weight} in rendered order, the 2-decimal rendered values."""
    body = text.strip()
    if not body.startswith(LAMBDA_PREFIX):
        raise ValueError(f"{text!r} is not a rendered lambda; it must start with {LAMBDA_PREFIX!r}")
    entries = (entry.partition("=") for entry in body[len(LAMBDA_PREFIX):].split(", "))
    return {name: float(value) for name, _, value in entries}


# --- rendering (3.1) ----------------------------------------------------------------------------------------


def test_format_exact_string_any_input_form():
    assert format_lambda(LAM, OBJ) == LINE
    assert format_lambda(dict(reversed(LAM.items())), OBJ) == LINE  # objective order, not mapping order
    assert format_lambda([0.5, 0.2, 0.2, 0.1], OBJ) == LINE
    assert format_lambda(torch.tensor([0.5, 0.2, 0.2, 0.1]), OBJ) == LINE
    # weights that round to 0.00 are left out: a vertex names one objective
    assert format_lambda({"helpfulness": 1.0}, OBJ) == "Preference weights: helpfulness=1.00"
    assert format_lambda([0.004, 0.496, 0.0, 0.5], OBJ) == "Preference weights: honesty=0.50, truthfulness=0.50"


def test_format_parse_round_trip():
    for lam in default_candidates(4, M=32, seed=3):
        parsed = parse_lambda_text(format_lambda(lam, OBJ))
        assert list(parsed) == [name for name, v in zip(OBJ, lam.tolist()) if round(v, 2) > 0]  # objective order
        assert [round(v, 2) for v in lambda_vector(parsed, OBJ, tol=0.02)] == [round(v, 2) for v in lam.tolist()]
    assert parse_lambda_text("  " + LINE + "\n") == LAM
    assert format_lambda(parse_lambda_text(LINE), OBJ) == LINE


def test_format_and_parse_errors():
    with pytest.raises(ValueError, match="unknown objective 'harmlessness'; valid objectives: helpfulness"):
        format_lambda({"harmlessness": 1.0}, OBJ)
    with pytest.raises(ValueError, match="expected 4 weights"):
        format_lambda([0.5, 0.5], OBJ)
    with pytest.raises(ValueError, match="must start with 'Preference weights: '"):
        parse_lambda_text("helpfulness=1.00")
    with pytest.raises(ValueError, match="objective name 'a=b' is invalid"):
        format_lambda([1.0], ["a=b"])


def test_condition_adds_system_message_without_mutating_input():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    before = copy.deepcopy(messages)
    out = condition_messages(messages, LAM, OBJ)
    assert out == [{"role": "system", "content": LINE}] + before
    assert messages == before and all(a is not b for a, b in zip(out[1:], messages))
    assert parse_lambda_text(out[0]["content"]) == LAM


def test_condition_prepends_to_existing_system_message():
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi", "id": 7}]
    before = copy.deepcopy(messages)
    out = condition_messages(messages, LAM, OBJ)
    assert out == [{"role": "system", "content": LINE + "\nYou are helpful."}, before[1]]
    assert messages == before
    assert parse_lambda_text(out[0]["content"].split("\n")[0]) == LAM


def test_condition_user_prefix_and_user_suffix():
    """user_prefix starts the first user turn; user_suffix ends the last one (the turn the reply answers)."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                {"role": "user", "content": "Again"}]
    before = copy.deepcopy(messages)
    out = condition_messages(messages, LAM, OBJ, placement="user_prefix")
    assert out == [{"role": "user", "content": LINE + "\n\nHi"}] + before[1:]
    out = condition_messages(messages, LAM, OBJ, placement="user_suffix")
    assert out == before[:2] + [{"role": "user", "content": "Again\n\n" + LINE}]
    assert messages == before
    for placement in ("user_prefix", "user_suffix"):
        with pytest.raises(ValueError, match="no user message"):
            condition_messages([{"role": "assistant", "content": "x"}], LAM, OBJ, placement=placement)
    with pytest.raises(ValueError, match="messages is empty"):
        condition_messages([], LAM, OBJ)
    with pytest.raises(ValueError, match="valid placements are system, user_prefix, user_suffix"):
        condition_messages(messages, LAM, OBJ, placement="footer")


def test_config_offers_exactly_the_renderer_placements():
    """lambdas.placement's choices (a Literal, for the config's errors) and PLACEMENTS are one list."""
    import typing

    from mallows_ray.config import LambdaConfig
    from mallows_ray.lambdas.vectors import PLACEMENTS

    assert typing.get_args(typing.get_type_hints(LambdaConfig)["placement"]) == PLACEMENTS


# --- CLI parsing --------------------------------------------------------------------------------------------


def test_parse_lambda_arg_good_inputs():
    assert parse_lambda_arg("helpfulness=0.7,honesty=0.3", OBJ) == (0.7, 0.3, 0.0, 0.0)
    assert parse_lambda_arg(" truthfulness = 0.5 ,  helpfulness=0.5 ", OBJ) == (0.5, 0.0, 0.0, 0.5)
    assert parse_lambda_arg("0.25, 0.25,0.25,0.25", OBJ) == (0.25,) * 4
    assert parse_lambda_arg("helpfulness=0.3334,honesty=0.3333,truthfulness=0.3332", OBJ, tol=1e-3)[0] == 0.3334
    assert parse_lambda_arg("helpfulness=2, honesty=2", OBJ, normalize=True) == (0.5, 0.5, 0.0, 0.0)
    assert parse_lambda_arg("3,1,0,0", OBJ, normalize=True) == (0.75, 0.25, 0.0, 0.0)
    # the same rules for config values: mappings (missing objectives are 0) and number sequences
    assert lambda_vector({"honesty": 1}, OBJ) == (0.0, 1.0, 0.0, 0.0)
    assert lambda_vector(torch.tensor([0.0, 0.0, 0.5, 0.5]), OBJ) == (0.0, 0.0, 0.5, 0.5)


@pytest.mark.parametrize("text, message", [
    ("harmlessness=1", r"unknown objective 'harmlessness'; valid objectives: helpfulness, honesty, "
                       r"instruction_following, truthfulness"),
    ("helpfulness=0.5,helpfulness=0.5", "duplicate objective 'helpfulness'"),
    ("helpfulness=abc", "helpfulness: 'abc' is not a number"),
    ("helpfulness=nan", "helpfulness: 'nan' is not finite"),
    ("helpfulness=1.2,honesty=-0.2", "honesty: -0.2 is negative"),
    ("helpfulness=0.5,honesty=0.3", r"the sum is 0.8, not 1 .*normalize=True"),
    ("helpfulness=0,honesty=0", "all zero"),
    ("0.5,0.5", "expected 4 weights in objective order"),
    ("helpfulness=0.5,0.5", "mixes 'name=value' entries and bare values"),
    ("helpfulness=1,", "empty entry"),
    ("=1", "no objective name"),
])
def test_parse_lambda_arg_errors_name_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        parse_lambda_arg(text, OBJ)


def test_parse_lambda_arg_all_zero_is_an_error_even_with_normalize():
    with pytest.raises(ValueError, match="all zero"):
        parse_lambda_arg("0,0,0,0", OBJ, normalize=True)


# --- candidates and score (3.2) -----------------------------------------------------------------------------


def test_default_candidates_vertices_uniform_simplex_deterministic():
    cands = default_candidates(4, M=16, seed=5)
    assert cands.shape == (16, 4)
    assert torch.equal(cands[:4], torch.eye(4)) and torch.allclose(cands[4], torch.full((4,), 0.25))
    assert (cands >= 0).all() and torch.allclose(cands.sum(-1), torch.ones(16))
    assert torch.equal(cands, default_candidates(4, M=16, seed=5))
    assert not torch.equal(cands, default_candidates(4, M=16, seed=6))
    assert default_candidates(3, M=4).shape == (4, 3)
    with pytest.raises(ValueError, match="M must be at least 5"):
        default_candidates(4, M=4)


def listwise_top1(rewards: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The listwise loss's top-1 accuracy [B], which `train/lambda_training.py` averages into score_j:
    lp = rewards, ref = 0 and beta = 1 make the implicit rewards r exactly `rewards`."""
    inputs = ListwiseInputs(policy_logps=rewards, reference_logps=torch.zeros_like(rewards),
                            lengths=torch.ones_like(rewards), target=target, response_mask=mask)
    return listwise(inputs, beta=1.0).accuracy


def test_listwise_top1_score():
    """Default score_j of section 3.2: the fraction of prompts where argmax_i r_i == argmax_i p_lambda_j[i]."""
    rewards = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, -1e9], [0.0, 1.0, 2.0], [5.0, 4.0, 3.0]])
    target = torch.tensor([[0.1, 0.6, 0.3], [0.2, 0.8, 0.0], [0.1, 0.2, 0.7], [0.5, 0.5, 0.0]])
    padded = torch.ones_like(target, dtype=torch.bool)
    padded[1, 2] = False  # row 2's last response is padding (reward -1e9, target 0)
    for mask in (None, padded):
        assert listwise_top1(rewards, target, mask).mean().item() == 0.75  # row 2 wrong; row 4's tie goes to index 0
    with pytest.raises(RuntimeError, match="size of tensor"):
        listwise_top1(rewards, target[:, :2])


# --- schedulers (3.2) ---------------------------------------------------------------------------------------


def test_fixed_always_returns_the_lambda():
    sched = build_scheduler("fixed", OBJ, lam="helpfulness=0.7, honesty=0.3")
    expected = torch.tensor([0.7, 0.3, 0.0, 0.0])
    samples = sched.sample(50, gen())
    assert samples.shape == (50, 4) and (samples == expected).all()
    assert sched.log_dict() == {"lambda/p_0": 1.0} and not sched.needs_eval
    assert isinstance(sched, FixedScheduler)


def test_table_chi_square():
    probs = [0.5, 0.2, 0.2, 0.1]
    sched = TableScheduler(torch.eye(4), probs)
    n = 20000
    indices = sched.sample_indices(n, gen(1))
    assert chi_square(indices, torch.tensor(probs)) < CHI2_999[3]
    assert torch.equal(sched.sample(n, gen(1)), torch.eye(4)[indices])  # sample() returns those rows
    assert sched.log_dict() == {f"lambda/p_{j}": p for j, p in enumerate(probs)}


def test_table_validation_and_factory():
    with pytest.raises(ValueError, match="lambdas row 1: the sum is 0.9"):
        TableScheduler([[1.0, 0.0], [0.4, 0.5]], [0.5, 0.5])
    with pytest.raises(ValueError, match="probs: the sum is 0.9"):
        TableScheduler([[1.0, 0.0], [0.5, 0.5]], [0.5, 0.4])
    with pytest.raises(ValueError, match="probs has 1 entries for 2 lambdas"):
        TableScheduler([[1.0, 0.0], [0.5, 0.5]], [1.0])
    sched = build_scheduler("table", OBJ, lambdas=["helpfulness=1", {"honesty": 1.0}, [0.25] * 4])
    assert torch.allclose(sched.probabilities(), torch.full((3,), 1 / 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="lambdas entry 1: unknown objective 'safety'"):
        build_scheduler("table", OBJ, lambdas=["helpfulness=1", "safety=1"])


def test_dirichlet_mean_and_simplex():
    alpha = [2.0, 1.0, 1.0, 0.5]
    sched = build_scheduler("dirichlet", OBJ, alpha=alpha)
    samples = sched.sample(20000, gen(2))
    assert samples.shape == (20000, 4) and (samples >= 0).all()
    assert torch.allclose(samples.sum(-1), torch.ones(20000), atol=1e-5)
    expected = torch.tensor(alpha) / sum(alpha)
    assert torch.allclose(samples.mean(0), expected, atol=0.01)
    assert torch.equal(samples, sched.sample(20000, gen(2)))  # the generator state fixes the draws
    g = gen(2)
    assert not torch.equal(sched.sample(8, g), sched.sample(8, g))  # and the generator advances
    symmetric = DirichletScheduler(1.0, 3).sample(20000, gen(3))
    assert torch.allclose(symmetric.mean(0), torch.full((3,), 1 / 3), atol=0.01)
    with pytest.raises(NotImplementedError, match="no finite candidate set"):
        sched.probabilities()
    with pytest.raises(ValueError, match=r"alpha\[1\]: -1 is negative"):
        DirichletScheduler([1.0, -1.0], 2)


def learned(**kw) -> LearnedScheduler:
    return build_scheduler("learned", OBJ, **kw)


def test_learned_starts_uniform_and_samples_its_probabilities():
    sched = learned()
    assert sched.needs_eval and sched.candidates.shape == (16, 4)
    assert torch.allclose(sched.probabilities(), torch.full((16,), 1 / 16, dtype=torch.float64))
    sched.update(torch.linspace(0, 1, 16))
    probs = sched.probabilities()
    assert probs[15] > probs[0] and probs.sum().item() == pytest.approx(1.0)
    indices = sched.sample_indices(20000, gen(4))
    assert chi_square(indices, probs) < CHI2_999[15]
    assert set(sched.log_dict()) == {f"lambda/p_{j}" for j in range(16)}


def test_learned_moves_probability_toward_the_best_candidate():
    sched = learned(lr=2.0, exploration=0.1)
    scores = torch.full((16,), 0.4)
    scores[3] = 0.6
    history = [sched.probabilities()[3].item()]
    for _ in range(20):
        sched.update(scores)
        history.append(sched.probabilities()[3].item())
    assert all(b > a for a, b in zip(history, history[1:]))
    assert history[-1] > 0.8


def test_learned_exploration_floor_holds():
    gamma, m = 0.2, 16
    sched = learned(lr=50.0, exploration=gamma)
    scores = torch.zeros(m)
    scores[0] = 1.0
    for _ in range(200):
        sched.update(scores)
    probs = sched.probabilities()
    assert (probs >= gamma / m * (1 - 1e-12)).all()
    assert probs[1:].max().item() == pytest.approx(gamma / m)  # the floor is reached, not undershot
    assert probs[0].item() == pytest.approx(1 - gamma + gamma / m)


def test_learned_progress_signal():
    sched = learned(signal="progress", lr=1.0)
    uniform = sched.probabilities()
    high = torch.full((16,), 0.3)
    high[2] = 0.9
    sched.update(high)  # first update: no previous score, w unchanged
    assert torch.equal(sched.probabilities(), uniform) and sched.steps == 1
    sched.update(high)  # same scores: zero progress, w unchanged (performance would keep favouring 2)
    assert torch.equal(sched.probabilities(), uniform)
    improved = high.clone()
    improved[5] = 0.5  # candidate 5 improves by 0.2, the others by 0
    sched.update(improved)
    probs = sched.probabilities()
    assert probs.argmax().item() == 5 and probs[5] > uniform[5] and probs[2] < uniform[2]
    # w_j += lr * (signal_j - mean): w_5 = 0.2 * 15/16, the others -0.2/16
    assert sched.weights[5].item() == pytest.approx(0.2 * 15 / 16)
    assert sched.weights[0].item() == pytest.approx(-0.2 / 16)


def test_learned_resume_is_identical():
    kw = dict(lr=0.7, exploration=0.05, temperature=0.5, signal="progress")
    scores = [torch.rand(16, generator=gen(s)) for s in range(6)]
    original = learned(**kw)
    for s in scores[:3]:
        original.update(s)
    state = json.loads(json.dumps(original.state_dict()))  # checkpoint-friendly plain values
    resumed = learned(**kw)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.probabilities(), original.probabilities()) and resumed.steps == 3
    for s in scores[3:]:
        original.update(s)
        resumed.update(s)
    assert torch.equal(resumed.probabilities(), original.probabilities())
    assert torch.equal(resumed.sample(64, gen(9)), original.sample(64, gen(9)))
    with pytest.raises(ValueError, match="other candidates"):
        learned(num_candidates=12).load_state_dict(state)
    with pytest.raises(ValueError, match="state is for mode 'learned', this scheduler is 'table'"):
        build_scheduler("table", OBJ, lambdas=["helpfulness=1"]).load_state_dict(state)


def test_learned_validation():
    with pytest.raises(ValueError, match="unknown signal 'regret'; valid signals: performance, progress"):
        learned(signal="regret")
    with pytest.raises(ValueError, match=r"exploration \(gamma\) must be in \[0, 1\]"):
        learned(exploration=1.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        learned(temperature=0.0)
    with pytest.raises(ValueError, match="scores must be 16 finite values"):
        learned().update(torch.zeros(15))


def test_build_scheduler_errors_and_parameters():
    with pytest.raises(ValueError, match="unknown lambda scheduler mode 'bandit'; valid modes: fixed, dirichlet, "
                                         "table, learned"):
        build_scheduler("bandit", OBJ)
    with pytest.raises(ValueError, match="mode 'learned' has no parameter 'gamma'; valid parameters: candidates, "
                                         "num_candidates, seed, temperature, lr, exploration, signal"):
        build_scheduler("learned", OBJ, gamma=0.1)
    with pytest.raises(ValueError, match="mode 'fixed' needs parameter lam"):
        build_scheduler("fixed", OBJ)
    assert scheduler_parameters("dirichlet") == ["alpha"]
    custom = build_scheduler("learned", OBJ, candidates=["helpfulness=1", "honesty=1", [0.25] * 4])
    assert custom.candidates.shape == (3, 4)
    with pytest.raises(ValueError, match="n must be a positive int"):
        custom.sample(0, gen())


def test_module_imports_no_ray_deepspeed_transformers():
    code = ("import sys, mallows_ray.lambdas.vectors, mallows_ray.lambdas.schedulers; "
            "print([m for m in ('ray', 'deepspeed', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
