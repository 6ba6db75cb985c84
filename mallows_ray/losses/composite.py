"""Weighted sums of losses, TRL's `loss_type=[...]` with `loss_weights` (e.g. MPO: sigmoid + bco_pair + sft,
RPO: dpo + nll):

    loss = sum_k weight_k * loss_k          per example; its batch mean is TRL's sum_k weight_k * mean_B(loss_k)

A term is {name, weight, params}: any registered loss (nll included) with its own parameters. Every term sees
the same inputs, so the terms must share a kind (all pairwise or all listwise). The output's rewards and
accuracy are those of the first term that ranks a prompt's replies (not nll, listwise_nll or lambda_contrast;
else of the first term); `LossOutput.terms` holds each term's unweighted per-example loss under its label (the
loss name; `name.k` for the k-th term when a name repeats), which the metrics report as `loss/<label>`.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from mallows_ray.losses.registry import SPECS, build_loss, loss_spec
from mallows_ray.losses.types import ListwiseInputs, Loss, LossOutput, PairwiseInputs

TERM_KEYS = ("name", "weight", "params")


@dataclass(frozen=True)
class Term:
    name: str
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, data: Any, where: str) -> "Term":
        """A term from {name, weight, params}; ValueError naming `where` (e.g. `loss.terms.1`) and the key."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: a term is a mapping {{name, weight, params}}, got {data!r}")
        unknown = sorted(set(data) - set(TERM_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r}; a term has {', '.join(TERM_KEYS)} (the loss's "
                             "own parameters go under params)")
        if "name" not in data:
            raise ValueError(f"{where}: a term needs a name (a loss name or nll)")
        weight, params = data.get("weight", 1.0), data.get("params") or {}
        if not isinstance(weight, numbers.Real) or isinstance(weight, bool) or not (
                math.isfinite(weight) and weight >= 0):
            raise ValueError(f"{where}.weight: {weight!r} is not a finite number >= 0")
        if not isinstance(params, Mapping):
            raise ValueError(f"{where}.params: expected a mapping of the loss's parameters, got {params!r}")
        term = cls(str(data["name"]), float(weight), dict(params))
        try:
            build_loss(term.name, **term.params)
        except ValueError as err:
            raise ValueError(f"{where}.{'params' if term.name in SPECS else 'name'}: {err}") from None
        return term

    def to_mapping(self) -> dict[str, Any]:
        return {"name": self.name, "weight": self.weight, "params": dict(self.params)}


def term_labels(terms: Sequence[Term]) -> list[str]:
    """Metric labels: the loss name, or `name.k` (k = the term's index) when a name repeats."""
    names = [t.name for t in terms]
    return [n if names.count(n) == 1 else f"{n}.{k}" for k, n in enumerate(names)]


def check_terms(terms: Sequence[Term], where: str = "loss.terms") -> None:
    """At least one term, one kind for all (pairwise or listwise)."""
    if not terms:
        raise ValueError(f"{where}: empty; give at least one term {{name, weight, params}}")
    kinds = {loss_spec(t.name).kind for t in terms}
    if len(kinds) > 1:
        raise ValueError(f"{where}: the terms mix pairwise and listwise losses "
                         f"({', '.join(f'{t.name}: {loss_spec(t.name).kind}' for t in terms)}); a composite loss "
                         "sees one kind of batch")


def lead_term(terms: Sequence[Term]) -> Term:
    """The term whose rewards and accuracy the composite reports: the first that ranks a prompt's replies (not
    a likelihood term, nll or listwise_nll, nor lambda_contrast), else the first."""
    return next((t for t in terms if not (loss_spec(t.name).likelihood or loss_spec(t.name).across_lambdas)),
                terms[0])


def weighted_terms(inputs: PairwiseInputs | ListwiseInputs, *,
              terms: Sequence[tuple[str, float, Callable[..., LossOutput]]], lead: int = 0) -> LossOutput:
    """sum_k weight_k * loss_k per example, from (label, weight, bound loss) triples; rewards of terms[lead]."""
    outputs = [(label, weight, fn(inputs)) for label, weight, fn in terms]
    losses = sum(weight * out.losses for _, weight, out in outputs)
    head = outputs[lead][2]
    return LossOutput(losses, head.chosen_rewards, head.rejected_rewards, head.accuracy, head.pair_accuracy,
                      terms={label: out.losses.detach() for label, _, out in outputs})


def build_composite(terms: Sequence[Term]) -> Loss:
    """The weighted sum of the terms as one loss (terms checked as `check_terms` does). It needs what any term
    needs; it compares lambdas when a term of weight > 0 does (a weight-0 term is switched off, e.g. by an
    ablation's override)."""
    check_terms(terms)
    labels = term_labels(terms)
    built = [build_loss(t.name, **t.params) for t in terms]
    bound = [(label, t.weight, loss) for label, t, loss in zip(labels, terms, built)]
    fn = functools.partial(weighted_terms, terms=bound, lead=list(terms).index(lead_term(terms)))
    params = {label: {"weight": t.weight, "params": dict(t.params)} for label, t in zip(labels, terms)}
    return Loss("+".join(labels), fn, params, built[0].kind, needs_reference=any(b.needs_reference for b in built),
                reads_dispersion=any(b.reads_dispersion for b in built), wpo=any(b.wpo for b in built),
                ld=any(b.ld for b in built),
                across_lambdas=any(b.across_lambdas for t, b in zip(terms, built) if t.weight > 0))
