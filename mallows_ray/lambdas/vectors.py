"""Preference weights lambda as vectors, and their rendering into prompts (ALGORITHMS.md sections 3, 3.1).

A lambda is K non-negative weights on the simplex, one per objective, in the order the dataset config fixes.
Users and configs write it as `helpfulness=0.7,honesty=0.3`, as a mapping name -> weight or as K numbers
(`LambdaLike`); `lambda_vector` (and `parse_lambda_arg` for `--lambda`) reads any of them into K floats.

Section 3.1 (lambda conditioning). The lambda used for an example is made visible to the model as one line,

    Preference weights: helpfulness=0.50, honesty=0.20, instruction_following=0.20, truthfulness=0.10

(2 decimals, objective order fixed by the dataset config; an objective whose weight rounds to 0.00 is left
out, so a vertex reads `Preference weights: honesty=1.00`), as a system message (the default), as a prefix of the
first user turn for models whose chat template has no system role, or as the end of the last user turn
(`PLACEMENTS`). `format_lambda` is the only place that knows this format and `condition_messages` places it.
Training, evaluation and generation all go through these functions.

Pure python + torch: nothing here imports ray, deepspeed or transformers.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence, Union

from torch import Tensor

LAMBDA_PREFIX = "Preference weights: "
# Where `condition_messages` puts the weights line. user_suffix (after the last user turn's text, right before
# the reply) is the place small models read best: on the demo data SmolLM2-135M learned to follow lambda there
# and not in the system message (issue 17's note).
PLACEMENTS = ("system", "user_prefix", "user_suffix")

# A lambda as users and configs write it: "helpfulness=0.7,honesty=0.3", {"helpfulness": 0.7, ...},
# or K numbers in objective order (list, tuple, 1-D tensor).
LambdaLike = Union[str, Mapping[str, float], Sequence[float], Tensor]


# --- parsing and validation ---------------------------------------------------------------------------------


def check_objectives(objectives: Sequence[str]) -> tuple[str, ...]:
    """The objective names as a tuple: non-empty, unique, and free of ',' and '=' (so the rendering parses)."""
    names = tuple(objectives)
    if not names:
        raise ValueError("objectives is empty; give at least one objective name")
    for name in names:
        if not isinstance(name, str) or not name or name != name.strip() or "," in name or "=" in name:
            raise ValueError(f"objective name {name!r} is invalid: it must be a non-empty string without "
                             "',' or '=' and without surrounding whitespace")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"objectives {list(names)} repeat {', '.join(duplicates)}")
    return names


def non_negative(label: str, raw: Any) -> float:
    """A weight (or parameter): a finite, non-negative number; the error names `label` and the offending value."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{label}: {raw!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{label}: {raw!r} is not finite")
    if value < 0:
        raise ValueError(f"{label}: {value:g} is negative; it must be >= 0")
    return value


def _parse_entries(text: str) -> dict[str, float] | list[float]:
    """`name=value, name=value` -> {name: value} (duplicates rejected), or `value, value` -> [value, ...]."""
    entries = [entry.strip() for entry in text.split(",")]
    if not all(entries):
        raise ValueError(f"empty entry in {text!r}; expected 'name=value, ...' or 'value, ...'")
    named = ["=" in entry for entry in entries]
    if not any(named):
        return [non_negative(f"entry {i}", entry) for i, entry in enumerate(entries)]
    if not all(named):
        raise ValueError(f"{text!r} mixes 'name=value' entries and bare values; use one form")
    weights: dict[str, float] = {}
    for entry in entries:
        name, _, raw = (part.strip() for part in entry.partition("="))
        if not name:
            raise ValueError(f"entry {entry!r} in {text!r} has no objective name before '='")
        if name in weights:
            raise ValueError(f"duplicate objective {name!r} in {text!r}")
        weights[name] = non_negative(name, raw)
    return weights


def _ordered(given: dict[str, float] | list[float], names: tuple[str, ...]) -> list[float]:
    """Weights in objective order: named objectives not given are 0; a bare list must have K entries."""
    if isinstance(given, dict):
        unknown = [name for name in given if name not in names]
        if unknown:
            raise ValueError(f"unknown objective {unknown[0]!r}; valid objectives: {', '.join(names)}")
        return [given.get(name, 0.0) for name in names]
    if len(given) != len(names):
        raise ValueError(f"expected {len(names)} weights in objective order ({', '.join(names)}), "
                         f"got {len(given)}")
    return given


def to_simplex(values: Sequence[float], normalize: bool, tol: float, what: str = "weights") -> tuple[float, ...]:
    """`values` on the probability simplex: not all zero; sum 1 within `tol`, or divided by their sum."""
    total = sum(values)
    if total == 0:
        raise ValueError(f"{what}: all zero; at least one needs a positive value")
    if normalize:
        return tuple(value / total for value in values)
    if abs(total - 1.0) > tol:
        raise ValueError(f"{what}: the sum is {total:.6g}, not 1 (tolerance {tol:g}); fix the values or pass "
                         "normalize=True to rescale them")
    return tuple(values)


def lambda_vector(lam: LambdaLike, objectives: Sequence[str], *, normalize: bool = False,
                  tol: float = 1e-3) -> tuple[float, ...]:
    """lambda as K floats in objective order (section 3): from a `name=value,...` / `v,v,...` string, a mapping
    name -> weight (objectives not named are 0) or K numbers in objective order. Weights must be finite and
    non-negative, not all zero, and sum to 1 within `tol` unless `normalize` divides them by their sum."""
    names = check_objectives(objectives)
    if isinstance(lam, str):
        given = _parse_entries(lam)
    elif isinstance(lam, Mapping):
        given = {str(name): non_negative(str(name), value) for name, value in lam.items()}
    else:
        given = [non_negative(f"entry {i}", value) for i, value in enumerate(lam)]
    return to_simplex(_ordered(given, names), normalize, tol)


def parse_lambda_arg(text: str, objectives: Sequence[str], *, normalize: bool = False,
                     tol: float = 1e-3) -> tuple[float, ...]:
    """A command-line lambda (section 3.1: `generate --lambda ...`): `helpfulness=0.7, honesty=0.3` (spaces
    allowed, objectives not named are 0) or a bare list of K numbers in objective order; see `lambda_vector`."""
    if not isinstance(text, str):
        raise TypeError(f"parse_lambda_arg expects a string like 'helpfulness=0.7,honesty=0.3', got {text!r}")
    return lambda_vector(text, objectives, normalize=normalize, tol=tol)


# --- rendering (section 3.1) --------------------------------------------------------------------------------


def format_lambda(lam: LambdaLike, objectives: Sequence[str]) -> str:
    """The one rendering of lambda shown to the model (section 3.1):
    `Preference weights: name_1=0.50, ..., name_K=0.10`, 2 decimals, in `objectives` order, objectives whose
    weight rounds to 0.00 left out (at least one never does: the weights sum to 1).

    Why zeros are left out: with every name listed, one vertex differs from another only in where `1.00`
    stands, and a model must bind each number to the name before it to tell them apart; without them, which
    objectives count is which names appear. (With every name listed, 60 LoRA steps on the demo data left
    SmolLM2-135M's replies under the three vertices within 0.02 of each other on every judge.)"""
    shown = [f"{name}={value:.2f}" for name, value in zip(objectives, lambda_vector(lam, objectives))]
    return LAMBDA_PREFIX + ", ".join(entry for entry in shown if not entry.endswith("=0.00"))


def condition_messages(messages: list[dict], lam: LambdaLike, objectives: Sequence[str], *,
                       placement: str = "system") -> list[dict]:
    """A NEW chat with lambda rendered in (section 3.1); `messages` and its dicts are left untouched.

    placement (one of PLACEMENTS):
      system       the weights line becomes a system message. If the chat already starts with a system message,
                   the line is prepended to its content (`line + "\\n" + content`) rather than adding a second
                   system message: many chat templates accept only one, leading, system message, and keeping the
                   line first puts it at the same place in every prompt.
      user_prefix  (templates without a system role) the line prefixes the first user turn: `line + "\\n\\n" + content`.
      user_suffix  the line ends the last user turn, the one the reply answers: `content + "\\n\\n" + line`.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r}: valid placements are {', '.join(PLACEMENTS)}")
    line = format_lambda(lam, objectives)
    if not messages:
        raise ValueError("messages is empty; a chat needs at least one user message to condition")
    out = [dict(message) for message in messages]
    if placement == "system":
        if out[0].get("role") == "system":
            out[0]["content"] = f"{line}\n{_content(out[0], 0)}"
        else:
            out.insert(0, {"role": "system", "content": line})
        return out
    users = [i for i, message in enumerate(out) if message.get("role") == "user"]
    if not users:
        roles = [message.get("role") for message in out]
        raise ValueError(f"no user message to hold the preference weights; roles are {roles}")
    user = users[0] if placement == "user_prefix" else users[-1]
    content = _content(out[user], user)
    out[user]["content"] = f"{line}\n\n{content}" if placement == "user_prefix" else f"{content}\n\n{line}"
    return out


def _content(message: dict, index: int) -> str:
    """A message's text content; the weights line can only be joined to a string."""
    content = message.get("content")
    if not isinstance(content, str):
        raise ValueError(f"message {index} ({message.get('role')!r}) content must be a string, got {content!r}")
    return content
