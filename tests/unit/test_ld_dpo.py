"""LD-DPO's `ld_alpha` (losses/length.py): the loss by hand and against TRL 1.16's formula, ld_alpha = 1 as the
plain loss, gradients, the policy's shared-length sums of the chunked path and of a tiny model against full
logits, the reference scoring column, the forward -> loss plumbing, and the config checks."""

import math

import pytest
import torch
from test_logprobs import make
from test_losses_trl import TRL_NAMES, trl_reference
from test_shared_prompt import batch_of_prompts, tiny_llama
from test_train_batches import _row

from mallows_ray.config import load_config
from mallows_ray.data.collate import pack_responses
from mallows_ray.data.scoring import score_responses
from mallows_ray.losses import (
    IGNORE_INDEX,
    SPECS,
    PairwiseInputs,
    Term,
    build_composite,
    build_loss,
    response_logprobs,
)
from mallows_ray.models import response_stats
from mallows_ray.train.batches import collate
from mallows_ray.train.objective import forward_loss
from mallows_ray.typed_config import ConfigError

D = torch.float64
LD_LOSSES = [n for n, spec in SPECS.items() if spec.kind == "pairwise" and n != "nll"]


def _pairs(b=6, seed=0):
    """Random pairs with their per-token log-probs [B, T] (policy and reference, chosen and rejected), zero past
    each reply's length, and the PairwiseInputs of their full and shared-length sums."""
    g = torch.Generator().manual_seed(seed)
    t = 8
    n_w, n_l = torch.randint(1, t + 1, (b,), generator=g), torch.randint(1, t + 1, (b,), generator=g)
    mask = lambda n: (torch.arange(t)[None] < n[:, None]).to(D)  # noqa: E731
    tokens = {k: -torch.rand(b, t, generator=g, dtype=D) * mask(n_w if k.endswith("w") else n_l)
              for k in ("pw", "pl", "rw", "rl")}
    shared = torch.minimum(n_w, n_l)
    prefix = lambda k: (tokens[k] * mask(shared)).sum(1)  # noqa: E731
    x = PairwiseInputs(tokens["pw"].sum(1), tokens["pl"].sum(1), tokens["rw"].sum(1), tokens["rl"].sum(1),
                       n_w.to(D), n_l.to(D), torch.rand(b, generator=g, dtype=D) + 0.5, None, None,
                       prefix("pw"), prefix("pl"), prefix("rw"), prefix("rl"))
    return x, tokens, n_w, n_l


def _trl_ld_sums(tokens, n_w, n_l, ld_alpha):
    """TRL 1.16 `_compute_loss`, transcribed: comp_pos = cumsum(mask), shared = min(n_w, n_l),
    logps = sum(logp * (0 < pos <= shared)) + ld_alpha * sum(logp * (pos > shared)), for each of the four."""
    t = tokens["pw"].shape[1]
    shared_lens = torch.minimum(n_w, n_l)
    out = {}
    for key, n in (("pw", n_w), ("pl", n_l), ("rw", n_w), ("rl", n_l)):
        comp_pos = (torch.arange(t)[None] < n[:, None]).long().cumsum(dim=1)
        shared_mask = (comp_pos > 0) & (comp_pos <= shared_lens.unsqueeze(1))
        tail_mask = comp_pos > shared_lens.unsqueeze(1)
        out[key] = (tokens[key] * shared_mask).sum(1) + ld_alpha * (tokens[key] * tail_mask).sum(1)
    return out


def test_dpo_by_hand():
    # chosen: 3 tokens, rejected: 1 token, so l = 1 and only the chosen reply has a tail
    t = lambda *v: torch.tensor(v, dtype=D)  # noqa: E731
    x = PairwiseInputs(t(-6.0), t(-1.0), t(-3.0), t(-2.0), t(3.0), t(1.0), None, None, None,
                       t(-2.0), t(-1.0), t(-1.0), t(-2.0))
    out = build_loss("dpo", beta=1.0, ld_alpha=0.25)(x)
    # lp(y_w) -> -2 + 0.25 * (-6 + 2) = -3; ref(y_w) -> -1 + 0.25 * (-3 + 1) = -1.5; the rejected stay -1, -2
    # u = (-3 + 1.5) - (-1 + 2) = -2.5
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(2.5)))
    assert out.chosen_rewards.item() == pytest.approx(-1.5) and out.rejected_rewards.item() == pytest.approx(1.0)
    # ld_alpha = 0: the chosen reply counts its first token only: u = (-2 + 1) - (-1 + 2) = -2
    assert build_loss("dpo", beta=1.0, ld_alpha=0.0)(x).losses.item() == pytest.approx(math.log1p(math.exp(2.0)))
    # simpo is reference-free: lp(y_w) -> -3 over the full n = 3: z = 2 * (-3 / 3 - (-1) / 1) - 0.5 = -0.5
    simpo = build_loss("simpo", beta=2.0, gamma=0.5, ld_alpha=0.25)(x)
    assert simpo.losses.item() == pytest.approx(math.log1p(math.exp(0.5)))


@pytest.mark.parametrize("name", LD_LOSSES)
def test_alpha_one_is_the_plain_loss(name):
    x, *_ = _pairs()
    plain = build_loss(name)(x)
    for off in (1.0, 1, None):
        out = build_loss(name, ld_alpha=off)(x)
        assert torch.equal(out.losses, plain.losses) and torch.equal(out.chosen_rewards, plain.chosen_rewards)
    # equal-length replies have no tail: any ld_alpha is the plain loss
    same = PairwiseInputs(*[getattr(x, f) for f in ("policy_chosen_logps", "policy_rejected_logps",
                                                    "reference_chosen_logps", "reference_rejected_logps",
                                                    "chosen_lengths", "rejected_lengths", "dispersion")],
                          None, None, x.policy_chosen_logps, x.policy_rejected_logps, x.reference_chosen_logps,
                          x.reference_rejected_logps)
    torch.testing.assert_close(build_loss(name, ld_alpha=0.3)(same).losses, build_loss(name)(same).losses,
                               rtol=0, atol=1e-12)
    assert not torch.allclose(build_loss(name, ld_alpha=0.3)(x).losses, plain.losses)  # the tail matters


@pytest.mark.parametrize("loss_type", [k for k in TRL_NAMES if k != "sft"])
def test_agrees_with_trls_ld_alpha(loss_type):
    name, params = TRL_NAMES[loss_type]
    for seed, ld_alpha in ((0, 0.5), (1, 0.0), (2, 0.9)):
        x, tokens, n_w, n_l = _pairs(b=16, seed=seed)
        trl = _trl_ld_sums(tokens, n_w, n_l, ld_alpha)
        plain_inputs = PairwiseInputs(trl["pw"], trl["pl"], trl["rw"], trl["rl"], x.chosen_lengths, x.rejected_lengths)
        theirs = trl_reference(loss_type, plain_inputs, 0.5, params.get("label_smoothing", 0.0))
        ours = build_loss(name, beta=0.5, ld_alpha=ld_alpha, **params)(x).losses
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10, msg=f"{loss_type} ld_alpha={ld_alpha}")


def test_gradcheck_float64():
    x, *_ = _pairs(b=4, seed=3)
    fields = ("policy_chosen_logps", "policy_rejected_logps", "policy_chosen_shared_logps",
              "policy_rejected_shared_logps")
    leaves = tuple(getattr(x, f).clone().requires_grad_() for f in fields)
    for name in ("dpo", "sigmoid_norm", "mallows_theta", "simpo"):
        loss = build_loss(name, ld_alpha=0.4)
        fn = lambda *v, loss=loss: loss(PairwiseInputs(**{**x.__dict__, **dict(zip(fields, v))})).losses  # noqa: E731
        assert torch.autograd.gradcheck(fn, leaves), name


def test_missing_shared_sums_name_their_source():
    x, *_ = _pairs()
    no_ref = PairwiseInputs(**{**x.__dict__, "reference_chosen_shared_logps": None})
    with pytest.raises(ValueError, match="reference log-prob sums.*ref_shared_logps"):
        build_loss("dpo", ld_alpha=0.5)(no_ref)
    build_loss("simpo", ld_alpha=0.5)(no_ref)  # reference-free: needs the policy's only
    with pytest.raises(ValueError, match="policy log-prob sums"):
        build_loss("simpo", ld_alpha=0.5)(PairwiseInputs(*list(x.__dict__.values())[:7]))


def naive_prefix(hidden, weight, labels, bias, prefix):
    """sum of the first prefix[b] labelled tokens' log-probs of row b, from full [B, T, V] logits."""
    logp = torch.log_softmax((hidden @ weight.T + bias).double(), -1)
    mask = labels != IGNORE_INDEX
    token = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    rank = mask.long().cumsum(1) - 1  # index of a labelled position within its row
    return (token * (mask & (rank < prefix[:, None]))).sum(1)


@pytest.mark.parametrize("chunk", [1, 4, None])
def test_prefix_sums_match_full_logits_with_gradients(chunk):
    h, w, b, labels = make()  # rows with 4, 5 and 0 labels
    prefix = torch.tensor([2, 9, 1])  # 9 > n: the whole reply
    leaves = [t.clone().double().requires_grad_(True) for t in (h, w, b)]
    stats = response_logprobs(*leaves[:2], labels, bias=leaves[2], chunk_tokens=chunk, prefix_lengths=prefix)
    want = naive_prefix(h.double(), w.double(), labels, b.double(), prefix)
    torch.testing.assert_close(stats.prefix_logp_sum, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(stats.prefix_logp_sum[1], stats.logp_sum[1], rtol=0, atol=1e-12)
    assert stats.prefix_logp_sum[2] == 0
    weights = torch.tensor([1.0, -0.5, 2.0], dtype=D)
    stats.prefix_logp_sum.mul(weights).sum().backward()
    ref = [t.clone().double().requires_grad_(True) for t in (h, w, b)]
    naive_prefix(*ref[:2], labels, ref[2], prefix).mul(weights).sum().backward()
    for mine, theirs in zip(leaves, ref):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=0, atol=1e-10)
    assert response_logprobs(h, w, labels).prefix_logp_sum is None  # only when asked for


def _naive_model_prefix(model, prompt, response, l):  # noqa: E741 (l of LD-DPO's notation)
    """log-prob sum of the first l tokens of `response` after `prompt`, from the model's full logits."""
    ids = torch.tensor([prompt + response])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(float(logp[len(prompt) - 1 + t, response[t]]) for t in range(min(l, len(response))))


@pytest.mark.parametrize("share", [False, True])
def test_model_prefix_sums_and_the_scoring_column(share):
    model = tiny_llama("sdpa")
    prompts, responses = batch_of_prompts()
    packed = pack_responses(prompts, responses, pad_id=0, share_prompt=share)
    l = packed.shared_lengths  # noqa: E741 (l of LD-DPO's notation)
    assert l.tolist() == [min(len(r) for r in resps) for resps in responses for _ in resps]
    with torch.no_grad():
        stats = response_stats(model, **packed.model_inputs(with_prefix=True), with_entropy=False)
        scored = score_responses(model, prompts, responses, pad_id=0, max_chunk_bytes=2**20, share_prompt=share)
        want = torch.tensor([_naive_model_prefix(model, p, r, min(len(x) for x in resps))
                             for p, resps in zip(prompts, responses) for r in resps], dtype=D)
    torch.testing.assert_close(stats.prefix_logp_sum.double(), want, rtol=0, atol=1e-4)
    column = torch.tensor([v for per_prompt in scored["ref_shared_logps"] for v in per_prompt], dtype=D)
    torch.testing.assert_close(column, want, rtol=0, atol=1e-4)
    full = torch.tensor([v for per_prompt in scored["ref_logps"] for v in per_prompt], dtype=D)
    longer = torch.tensor([len(r) > min(len(x) for x in resps) for resps in responses for r in resps])
    assert longer.any() and (column[~longer] == full[~longer]).all() and (column[longer] != full[longer]).all()


def test_forward_loss_hands_the_shared_sums_to_the_loss():
    rows = [_row(0), _row(1, response_lens=(4, 2))]  # (n_w, n_l) = (2, 3), (4, 2): l = 2; ref = -n(y)
    for row, shared in zip(rows, ([-2.0, -2.0], [-1.0, -2.0])):  # a reply of length l: ref_l(y) = ref(y)
        row["ref_shared_logps"] = shared
    batch = collate(rows, pad_id=0, with_scores=False)
    logps, prefix = torch.tensor([-1.0, -5.0, -6.0, -1.5]), torch.tensor([-1.0, -3.0, -2.0, -1.5])
    seen = {}

    def model(**inputs):
        seen.update(inputs)
        return (logps, None, prefix) if "prefix_lengths" in inputs else logps

    out = forward_loss(model, batch, build_loss("dpo", beta=1.0, ld_alpha=0.5))
    assert seen["prefix_lengths"].tolist() == [2, 2, 2, 2]
    # pair 0: lp_w = -1, lp_l = -3 + 0.5 (-5 + 3) = -4, ref_w = -2, ref_l = -2 + 0.5 (-3 + 2) = -2.5:
    #   u = (-1 + 2) - (-4 + 2.5) = 2.5
    # pair 1: lp_w = -2 + 0.5 (-6 + 2) = -4, lp_l = -1.5, ref_w = -1 + 0.5 (-4 + 1) = -2.5, ref_l = -2:
    #   u = (-4 + 2.5) - (-1.5 + 2) = -2
    torch.testing.assert_close(out.losses, torch.tensor([math.log1p(math.exp(-2.5)), math.log1p(math.exp(2))]))
    seen.clear()
    forward_loss(model, batch, build_loss("dpo"))
    assert "prefix_lengths" not in seen


def test_ld_alpha_config():
    assert load_config(None, ["loss.name=dpo", "loss.ld_alpha=0.5"]).loss.build().ld
    for off in ("1.0", "null"):
        assert not load_config(None, ["loss.name=dpo", f"loss.ld_alpha={off}"]).loss.build().ld
    terms = load_config(None, ["loss={terms: [{name: dpo, params: {ld_alpha: 0.2}}, {name: nll}]}"]).loss
    assert terms.build().ld
    for bad in ("1.5", "-0.1", ".nan"):
        with pytest.raises(ConfigError, match=r"'ld_alpha'.*out of range; expected a finite value in \[0, 1\]"):
            load_config(None, ["loss.name=ipo", f"loss.ld_alpha={bad}"])
    for name, needle in (("listwise", "this loss is listwise"), ("nll", "chosen reply's likelihood")):
        with pytest.raises(ConfigError, match=f"takes no 'ld_alpha' parameter.*{needle}"):
            load_config(None, [f"loss.name={name}", "loss.ld_alpha=0.5"])
    with pytest.raises(ConfigError, match="must be a number"):
        load_config(None, ["loss.name=dpo", "loss.ld_alpha=true"])
    # a composite term with ld_alpha, another without: each term sees its own inputs
    x, *_ = _pairs()
    mix = build_composite([Term("dpo", 1.0, {"ld_alpha": 0.5}), Term("nll", 0.5)])(x)
    expected = build_loss("dpo", ld_alpha=0.5)(x).losses + 0.5 * build_loss("nll")(x).losses
    torch.testing.assert_close(mix.losses, expected)


@pytest.mark.parametrize("share", [False, True])
def test_policy_equal_to_reference_gives_log_2_through_the_policy_module(share):
    """The training module (engine.PolicyLogprobs, as DeepSpeed wraps it) with ld_alpha, on rows scored by the
    same weights: its shared-length sums meet the scoring column's, every LD-weighted log-ratio is 0."""
    from mallows_ray.train.engine import PolicyLogprobs

    model = tiny_llama("sdpa")
    prompts, responses = batch_of_prompts(seed=1)
    pairs = [resps[:2] for resps in responses]
    scored = score_responses(model, prompts, pairs, pad_id=0, max_chunk_bytes=2**20)
    rows = [{"id": f"p{i}", "prompt_ids": p, "response_ids": r, "ref_logps": scored["ref_logps"][i].tolist(),
             "ref_shared_logps": scored["ref_shared_logps"][i].tolist(), "dispersion": 1.0}
            for i, (p, r) in enumerate(zip(prompts, pairs))]
    assert any(len(a) != len(b) for a, b in pairs)  # some pair has a tail
    batch = collate(rows, pad_id=0, with_scores=False, share_prompt=share)
    for wpo in (False, True):
        policy = PolicyLogprobs(model, zero_stage=0, with_wpo=wpo)
        loss = build_loss("dpo", beta=1.0, ld_alpha=0.3, wpo=wpo)
        with torch.no_grad():
            out = forward_loss(policy, batch, loss)
            plain = forward_loss(policy, batch, build_loss("dpo", beta=1.0, wpo=wpo))
        # a wrong policy or reference shared sum would leave a nonzero LD-weighted log-ratio, hence reward
        torch.testing.assert_close(out.losses, plain.losses, rtol=0, atol=1e-5)
        torch.testing.assert_close(out.chosen_rewards, torch.zeros(len(rows)), rtol=0, atol=1e-5)
        if not wpo:
            torch.testing.assert_close(out.losses, torch.full((len(rows),), math.log(2)), rtol=0, atol=1e-5)
