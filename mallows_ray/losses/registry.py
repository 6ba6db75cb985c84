"""The one place that maps config names to loss functions (ALGORITHMS.md sections 1-3) and checks their parameters."""

from __future__ import annotations

import functools
import inspect
import numbers
from typing import Any, Callable

from mallows_ray.losses.listwise import listwise, plackett_luce
from mallows_ray.losses.mallows import mallows_phi, mallows_theta
from mallows_ray.losses.pairwise import cdpo, dpo, ipo, robust, simpo
from mallows_ray.losses.types import ListwiseInputs, LossOutput, PairwiseInputs

PAIRWISE_LOSSES: dict[str, Callable[..., LossOutput]] = {
    "dpo": dpo, "cdpo": cdpo, "robust": robust, "ipo": ipo, "simpo": simpo,
    "mallows_theta": mallows_theta, "mallows_phi": mallows_phi,
}
LISTWISE_LOSSES: dict[str, Callable[..., LossOutput]] = {"listwise": listwise, "plackett_luce": plackett_luce}
LOSSES = {**PAIRWISE_LOSSES, **LISTWISE_LOSSES}
REFERENCE_FREE = frozenset({"simpo"})  # losses that never read ref(y)


def _lookup(name: str) -> Callable[..., LossOutput]:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(LOSSES)}")
    return LOSSES[name]


def loss_parameters(name: str) -> dict[str, Any]:
    """Keyword parameters of a loss and their defaults, e.g. {'beta': 0.1, 'dispersion': False}."""
    signature = inspect.signature(_lookup(name))
    return {p.name: p.default for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY}


def _same_kind(value: Any, default: Any) -> bool:
    """bool parameters take bools; numeric ones take real numbers (ints, floats, numpy scalars; not bools)."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def build_loss(name: str, **params: Any) -> Callable[[PairwiseInputs | ListwiseInputs], LossOutput]:
    """The loss with its parameters bound; unknown names or parameters raise with the valid choices."""
    valid = loss_parameters(name)
    for key, value in params.items():
        if key not in valid:
            raise ValueError(f"loss {name!r} has no parameter {key!r}; valid parameters: {', '.join(valid)}")
        if not _same_kind(value, valid[key]):
            kind = "true or false" if isinstance(valid[key], bool) else "a number"
            raise ValueError(f"loss {name!r} parameter {key!r} must be {kind}, got {value!r}")
    return functools.partial(LOSSES[name], **params)


def is_listwise(name: str) -> bool:
    _lookup(name)
    return name in LISTWISE_LOSSES


def uses_dispersion(name: str, params: dict[str, Any]) -> bool:
    """Whether the loss reads s(x): the Mallows losses always, the others with dispersion=True."""
    _lookup(name)
    return name.startswith("mallows_") or bool(params.get("dispersion", False))
