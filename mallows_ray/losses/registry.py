"""The one place that maps config names to loss functions (ALGORITHMS.md sections 1-3) and checks their parameters.

Each loss has a small typed `LossSpec`: its function, whether it is pairwise or listwise, whether it reads the
reference log-probs, how it relates to the dispersion s(x), and the valid range of its numeric parameters.
`build_loss` checks a parameter set against it, so a bad value fails at config load, before Ray starts.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from mallows_ray.losses.length import ld_weighted
from mallows_ray.losses.listwise import lambda_contrast, listwise, listwise_nll, plackett_luce
from mallows_ray.losses.mallows import mallows_ipo, mallows_phi, mallows_simpo, mallows_theta
from mallows_ray.losses.pairwise import cdpo, dpo, ipo, robust, simpo
from mallows_ray.losses.scores import F_DIVERGENCES
from mallows_ray.losses.trl_pairwise import (
    NLL_REDUCTIONS,
    aot,
    aot_unpaired,
    apo_down,
    apo_zero,
    bco_pair,
    discopop,
    exo_pair,
    hinge,
    nca_pair,
    nll,
    sigmoid_norm,
    sppo_hard,
)
from mallows_ray.losses.types import Loss, LossOutput
from mallows_ray.losses.weighting import wpo_weighted


@dataclass(frozen=True)
class Interval:
    """A numeric parameter's valid values: finite, within low..high, each end open or closed."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE = Interval(0.0, math.inf, low_open=True, high_open=True)
NON_NEGATIVE = Interval(0.0, math.inf, high_open=True)
HALF_OPEN_SMOOTHING = Interval(0.0, 0.5, high_open=True)  # a flip rate of 1/2 carries no preference
# numeric parameters shared by many losses; a spec's own `ranges` win
DEFAULT_RANGES = {"beta": POSITIVE, "tau": POSITIVE, "gamma": NON_NEGATIVE, "home_advantage": NON_NEGATIVE,
                  "label_smoothing": HALF_OPEN_SMOOTHING, "f_alpha": Interval(), "ld_alpha": Interval(0.0, 1.0)}
CHOICES = {"f_divergence": F_DIVERGENCES, "reduction": NLL_REDUCTIONS}


@dataclass(frozen=True)
class LossSpec:
    fn: Callable[..., LossOutput]
    kind: Literal["pairwise", "listwise"] = "pairwise"
    reference: bool = True  # reads ref(y)
    # "always": reads s(x) by definition (the Mallows losses); "option": with dispersion=True; "never": no
    # single preference logit for s(x) to scale (`no_dispersion` says why)
    dispersion: Literal["always", "option", "never"] = "option"
    batch_level: bool = False  # one example's loss depends on the others of its micro-batch
    wpo: bool = True  # takes `wpo: true` (weighting.py); pairwise losses but the sorting ones
    ld: bool = True  # takes `ld_alpha` (length.py); pairwise losses but nll
    ranges: dict[str, Interval] = field(default_factory=dict)
    no_dispersion: str = ""
    likelihood: bool = False  # a likelihood (SFT) term with no preference logit: a composite reports another term
    across_lambdas: bool = False  # compares a prompt's rows under different lambdas: needs lambdas.vertex_copies


_SEPARATE = "it scores the chosen and the rejected reply separately, so there is no pairwise logit for s(x) to scale"
_SORTED = "it pairs quantiles of the batch sorted over different prompts, so no prompt's s(x) belongs to a pair"
SPECS: dict[str, LossSpec] = {
    "dpo": LossSpec(dpo), "cdpo": LossSpec(cdpo), "robust": LossSpec(robust), "ipo": LossSpec(ipo),
    "simpo": LossSpec(simpo, reference=False),
    "mallows_theta": LossSpec(mallows_theta, dispersion="always"),
    "mallows_phi": LossSpec(mallows_phi, dispersion="always"),
    "mallows_simpo": LossSpec(mallows_simpo, reference=False, dispersion="always"),
    "mallows_ipo": LossSpec(mallows_ipo, dispersion="always"),
    "hinge": LossSpec(hinge),
    "exo_pair": LossSpec(exo_pair, ranges={"label_smoothing": Interval(0.0, 1.0, low_open=True, high_open=True)}),
    "nca_pair": LossSpec(nca_pair, dispersion="never", no_dispersion=_SEPARATE),
    "bco_pair": LossSpec(bco_pair, dispersion="never", no_dispersion=_SEPARATE),
    "sppo_hard": LossSpec(sppo_hard, dispersion="never", no_dispersion=_SEPARATE),
    "aot": LossSpec(aot, dispersion="never", batch_level=True, wpo=False, no_dispersion=_SORTED),
    "aot_unpaired": LossSpec(aot_unpaired, dispersion="never", batch_level=True, wpo=False, no_dispersion=_SORTED),
    "apo_zero": LossSpec(apo_zero, dispersion="never", no_dispersion=_SEPARATE),
    "apo_down": LossSpec(apo_down, dispersion="never", no_dispersion=_SEPARATE),
    "discopop": LossSpec(discopop),
    "sigmoid_norm": LossSpec(sigmoid_norm),
    "nll": LossSpec(nll, reference=False, dispersion="never", ld=False, likelihood=True,
                    no_dispersion="it is the likelihood of the chosen reply alone, with no preference logit"),
    "listwise": LossSpec(listwise, kind="listwise", wpo=False, ld=False),
    "plackett_luce": LossSpec(plackett_luce, kind="listwise", wpo=False, ld=False),
    "listwise_nll": LossSpec(listwise_nll, kind="listwise", reference=False, dispersion="never", wpo=False, ld=False,
                             likelihood=True, no_dispersion="it is the likelihood of the replies, with no "
                             "preference logit"),
    "lambda_contrast": LossSpec(lambda_contrast, kind="listwise", reference=False, dispersion="never", wpo=False,
                                ld=False, batch_level=True, across_lambdas=True,
                                no_dispersion="its softmax runs over one prompt's lambdas, so s(x) is one constant "
                                "scale of it, the role of beta"),
}
def loss_spec(name: str) -> LossSpec:
    if name not in SPECS:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(SPECS)}")
    return SPECS[name]


def loss_parameters(name: str) -> dict[str, Any]:
    """Keyword parameters of a loss and their defaults, e.g. {'beta': 0.1, 'dispersion': False, ...}."""
    signature = inspect.signature(loss_spec(name).fn)
    return {p.name: p.default for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY}


def _same_kind(value: Any, default: Any) -> bool:
    """bool parameters take bools; str ones strings; numeric ones real numbers (ints, floats, numpy scalars;
    not bools)."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_parameters(name: str, params: dict[str, Any]) -> None:
    """Names, kinds, ranges and choices of a loss's parameters; raises ValueError naming the parameter."""
    spec, valid = loss_spec(name), loss_parameters(name)
    if spec.wpo:
        valid["wpo"] = False
    if spec.ld:
        valid["ld_alpha"] = 1.0
    for key, value in params.items():
        if key == "ld_alpha" and not spec.ld:
            raise ValueError(f"loss {name!r} takes no 'ld_alpha' parameter: LD-DPO weights the tokens past the "
                             "shorter reply of a pair, and " + (
                                 "this loss is listwise" if spec.kind == "listwise" else
                                 "this loss is the chosen reply's likelihood alone (TRL's sft term is unweighted)"))
        if key == "ld_alpha" and value is None:  # TRL's spelling of "off"
            continue
        if key == "wpo" and not spec.wpo:
            raise ValueError(f"loss {name!r} takes no 'wpo' parameter: WPO weights one pair's loss, and "
                             + ("this loss is listwise" if spec.kind == "listwise" else
                                "this loss's i-th value is a quantile of the sorted batch, not pair i's"))
        if key == "dispersion" and spec.dispersion != "option":
            why = ("it always reads s(x); drop the key" if spec.dispersion == "always"
                   else f"the dispersion plug-in has no meaning for it: {spec.no_dispersion}")
            raise ValueError(f"loss {name!r} takes no 'dispersion' parameter: {why}")
        if key not in valid:
            raise ValueError(f"loss {name!r} has no parameter {key!r}; valid parameters: {', '.join(valid)}")
        if not _same_kind(value, valid[key]):
            kind = {bool: "true or false", str: "a string"}.get(type(valid[key]), "a number")
            raise ValueError(f"loss {name!r} parameter {key!r} must be {kind}, got {value!r}")
        if key in CHOICES and value not in CHOICES[key]:
            raise ValueError(f"loss {name!r} parameter {key!r}: {value!r} is not one of {', '.join(CHOICES[key])}")
        interval = spec.ranges.get(key, DEFAULT_RANGES.get(key))
        if interval is not None and not isinstance(value, (bool, str)) and not interval.contains(float(value)):
            raise ValueError(f"loss {name!r} parameter {key!r}: {value!r} is out of range; expected a finite "
                             f"value in {interval}")


def _ld_on(params: dict[str, Any]) -> bool:
    """LD-DPO is on with `ld_alpha` set and below 1 (1 is the plain loss; None is TRL's spelling of off)."""
    ld_alpha = params.get("ld_alpha")
    return ld_alpha is not None and float(ld_alpha) != 1.0


def build_loss(name: str, **params: Any) -> Loss:
    """The loss with its parameters bound; unknown names or bad parameters raise with the valid choices."""
    check_parameters(name, params)
    given = dict(params)
    spec, wpo, ld = SPECS[name], bool(params.pop("wpo", False)), _ld_on(params)
    ld_alpha = params.pop("ld_alpha", None)
    fn = functools.partial(spec.fn, **params)
    if ld:
        fn = functools.partial(ld_weighted, loss=fn, ld_alpha=float(ld_alpha), reference=spec.reference)
    if wpo:
        fn = functools.partial(wpo_weighted, loss=fn)
    # s(x): the Mallows losses always, the others with dispersion=True
    reads_dispersion = spec.dispersion == "always" or (spec.dispersion == "option" and params.get("dispersion", False))
    return Loss(name, fn, given, spec.kind, needs_reference=spec.reference, reads_dispersion=bool(reads_dispersion),
                wpo=wpo, ld=ld, across_lambdas=spec.across_lambdas)
