"""Our losses against TRL 1.16's own `DPOTrainer._compute_loss`, where TRL is installed (the `bench` extra;
CI's `.[test]` skips this file and relies on the transcribed reference in test_losses_trl.py).

`_compute_loss` is called unbound with the attributes it reads (beta, loss types and weights, f-divergence,
label smoothing, an accelerator whose gathers are identities) and a stand-in for the fused-head model call
that returns given per-token log-probs: TRL's loss arithmetic runs unchanged on numbers we choose, and its
scalar loss (sum_k w_k mean_B loss_k) is compared with the batch mean of ours. Reference log-probs go in as
TRL's precomputed `ref_chosen_logps` / `ref_rejected_logps`.
"""

import contextlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from mallows_ray.losses import PairwiseInputs, Term, build_composite

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")

from test_losses_trl import TRL_F_DIVERGENCE, TRL_NAMES  # noqa: E402


def _batch(b=8, t=7, seed=0, dtype=torch.float64):
    """Per-token policy log-probs [2B, T-1] (rows: B chosen then B rejected), zero outside the completion,
    completions of 1..T-1 tokens after a one-token prompt; reference sums [B] each."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t, (2 * b,), generator=g)
    completion = torch.zeros(2 * b, t, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        completion[i, 1:1 + n] = 1
    token_logps = -torch.rand(2 * b, t - 1, generator=g, dtype=dtype) * completion[:, 1:]
    ref = -(torch.rand(2 * b, generator=g, dtype=dtype) * lengths)
    return completion, token_logps, ref, lengths


def _trl_loss(loss_types, weights, completion, token_logps, ref, *, beta, label_smoothing=0.0,
              f_divergence_type="reverse_kl", f_alpha=0.5, tau=0.05, log_sum_sq=None, ld_alpha=None):
    """TRL's scalar loss; `ref` is either the precomputed sums [2B] or, [2B, T-1], the reference model's
    per-token log-probs (TRL then runs its reference forward, where ld_alpha weights them too)."""
    b = completion.shape[0] // 2
    trainer = _trainer(token_logps, log_sum_sq, ld_alpha, ref if ref.dim() == 2 else None)
    trainer.__dict__.update(
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha, loss_types=loss_types,
        loss_weights=weights, beta=beta, label_smoothing=label_smoothing, use_weighting=log_sum_sq is not None,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    trainer.args.discopop_tau = tau
    inputs = {"input_ids": torch.zeros_like(completion), "attention_mask": torch.ones_like(completion),
              "completion_mask": completion}
    if ref.dim() == 1:
        inputs.update(ref_chosen_logps=ref[:b], ref_rejected_logps=ref[b:])
    return trl_dpo.DPOTrainer._compute_loss(trainer, trainer.model, inputs, return_outputs=False)


class _FusedHead(torch.nn.Module):
    """Stands in for a model called with TRL's `fused_lm_head=True`: returns the given per-token log-probs."""

    is_gradient_checkpointing = False

    def __init__(self, logps, log_sum_sq=None):
        super().__init__()
        self.logps, self.log_sum_sq = logps, log_sum_sq

    def forward(self, **kwargs):
        return SimpleNamespace(log_probs=self.logps, entropy=torch.zeros_like(self.logps),
                               mean_logits=torch.zeros_like(self.logps),
                               is_top1=torch.zeros_like(self.logps, dtype=torch.bool), log_sum_sq_probs=self.log_sum_sq)


def _trainer(token_logps, log_sum_sq=None, ld_alpha=None, ref_token_logps=None):
    """The attributes of a DPOTrainer that its forward paths read; its model (and reference model) stand in for
    the fused LM head."""
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x,
                                  autocast=contextlib.nullcontext, unwrap_model=lambda m: m)
    policy = _FusedHead(token_logps, log_sum_sq)
    return SimpleNamespace(
        model=policy, ref_model=None if ref_token_logps is None else _FusedHead(ref_token_logps),
        accelerator=accelerator, aux_loss_enabled=False, ld_alpha=ld_alpha,
        precompute_ref_logps=ref_token_logps is None, args=SimpleNamespace(gradient_checkpointing_kwargs=None))


def _ours(terms, token_logps, ref, lengths, aligned=None):
    b = lengths.shape[0] // 2
    sums = token_logps.sum(dim=1)
    x = PairwiseInputs(sums[:b], sums[b:], ref[:b], ref[b:], lengths[:b].to(sums.dtype), lengths[b:].to(sums.dtype),
                       None, *((None, None) if aligned is None else (aligned[:b], aligned[b:])))
    return build_composite(terms)(x).losses.mean()


@pytest.mark.parametrize("loss_type", list(TRL_NAMES))
def test_each_loss_type_matches_trls_trainer(loss_type):
    name, params = TRL_NAMES[loss_type]
    kinds = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence") if loss_type in TRL_F_DIVERGENCE \
        else ("reverse_kl",)
    for seed, beta in ((0, 0.1), (1, 1.0)):
        completion, token_logps, ref, lengths = _batch(seed=seed)
        for kind in kinds:
            # TRL's alpha-divergence clamp table has no float64 entry: that case runs in float32
            dtype = torch.float32 if kind == "alpha_divergence" else torch.float64
            tl, rf = token_logps.to(dtype), ref.to(dtype)
            theirs = _trl_loss([loss_type], [1.0], completion, tl, rf, beta=beta,
                               label_smoothing=params.get("label_smoothing", 0.0), f_divergence_type=kind, f_alpha=0.3)
            extra = {} if kind == "reverse_kl" else {"f_divergence": kind, "f_alpha": 0.3}
            ours = _ours([Term(name, 1.0, {**({} if name == "nll" else {"beta": beta}), **params, **extra})], tl, rf,
                         lengths)
            torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=0, atol=1e-6,
                                       msg=f"{loss_type} {kind} beta={beta}")


def test_weighted_mix_matches_trls_trainer():
    completion, token_logps, ref, lengths = _batch(seed=5)
    theirs = _trl_loss(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], completion, token_logps, ref, beta=0.1)
    ours = _ours([Term("dpo", 0.8, {"beta": 0.1}), Term("bco_pair", 0.2, {"beta": 0.1}),
                  Term("nll", 1.0, {"reduction": "token"})], token_logps, ref, lengths)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_wpo_weighting_matches_trls_use_weighting():
    completion, token_logps, ref, lengths = _batch(seed=7)
    g = torch.Generator().manual_seed(8)
    log_sum_sq = -torch.rand(token_logps.shape, generator=g, dtype=token_logps.dtype) * 3  # log sum_v p_v^2 <= 0
    mask = completion[:, 1:]
    aligned = ((token_logps - log_sum_sq) * mask).sum(1) / lengths  # a(y), as logprobs.py computes it
    for loss_types, weights, terms in (
            (["sigmoid"], [1.0], [Term("dpo", 1.0, {"beta": 0.5, "wpo": True})]),
            # not with sft: TRL 1.16 raises there (`*=` on the expanded scalar sft loss)
            (["hinge", "bco_pair"], [1.0, 0.3], [Term("hinge", 1.0, {"beta": 0.5, "wpo": True}),
                                                 Term("bco_pair", 0.3, {"beta": 0.5, "wpo": True})])):
        theirs = _trl_loss(loss_types, weights, completion, token_logps, ref, beta=0.5, log_sum_sq=log_sum_sq)
        torch.testing.assert_close(_ours(terms, token_logps, ref, lengths, aligned), theirs, rtol=0, atol=1e-6)


def _shared_sums(token_logps, lengths):
    """[2B] sums of each reply's first l = min(n(y_w), n(y_l)) tokens (completions start after the prompt)."""
    b = lengths.shape[0] // 2
    shared = torch.minimum(lengths[:b], lengths[b:]).repeat(2)
    return (token_logps * (torch.arange(token_logps.shape[1])[None] < shared[:, None])).sum(1)


def _ours_ld(terms, token_logps, ref_token_logps, lengths):
    b = lengths.shape[0] // 2
    sums, ref = token_logps.sum(1), ref_token_logps.sum(1)
    shared, ref_shared = _shared_sums(token_logps, lengths), _shared_sums(ref_token_logps, lengths)
    x = PairwiseInputs(sums[:b], sums[b:], ref[:b], ref[b:], lengths[:b].to(sums.dtype), lengths[b:].to(sums.dtype),
                       None, None, None, shared[:b], shared[b:], ref_shared[:b], ref_shared[b:])
    return build_composite(terms)(x).losses.mean()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sigmoid_norm", "bco_pair", "aot", "apo_down"])
def test_ld_alpha_matches_trls_trainer(loss_type):
    name, params = TRL_NAMES[loss_type]
    for seed, ld_alpha in ((9, 0.5), (10, 0.0)):
        completion, token_logps, _, lengths = _batch(seed=seed)
        g = torch.Generator().manual_seed(seed + 100)
        ref_tokens = -torch.rand(token_logps.shape, generator=g, dtype=token_logps.dtype) * completion[:, 1:]
        theirs = _trl_loss([loss_type], [1.0], completion, token_logps, ref_tokens, beta=0.5,
                           label_smoothing=params.get("label_smoothing", 0.0), ld_alpha=ld_alpha)
        ours = _ours_ld([Term(name, 1.0, {"beta": 0.5, "ld_alpha": ld_alpha, **params})], token_logps, ref_tokens,
                        lengths)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6, msg=f"{loss_type} ld_alpha={ld_alpha}")
        plain = _ours([Term(name, 1.0, {"beta": 0.5, **params})], token_logps, ref_tokens.sum(1), lengths)
        assert not torch.isclose(ours, plain), "the batch has replies longer than their pair's shorter one"


def test_precomputed_reference_matches_trls_compute_ref_log_probs():
    """TRL's precompute pass with ld_alpha gives shared + ld_alpha * tail: what `ref_shared_logps` (the scoring
    column) and ld_weighted rebuild from ref(y) and ref_l(y)."""
    completion, _, _, lengths = _batch(seed=11)
    g = torch.Generator().manual_seed(12)
    ref_tokens = -torch.rand(completion[:, 1:].shape, generator=g, dtype=torch.float64) * completion[:, 1:]
    trainer = _trainer(ref_tokens, ld_alpha=0.3)
    inputs = {"input_ids": torch.zeros_like(completion), "attention_mask": torch.ones_like(completion),
              "completion_mask": completion}
    chosen, rejected = trl_dpo.DPOTrainer.compute_ref_log_probs(trainer, trainer.model, inputs)
    full, shared = ref_tokens.sum(1), _shared_sums(ref_tokens, lengths)
    torch.testing.assert_close(torch.cat([chosen, rejected]), shared + 0.3 * (full - shared), rtol=0, atol=1e-12)
