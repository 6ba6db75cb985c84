"""Reading a raw record's fields, for the normalisers (`normalisers.py`): each reader returns the typed value
or raises `RowError`, which carries the reject reason (`rejects.REASONS`) and a detail naming the field and
what would be valid. Also the checks on the parts a normaliser returns: a prompt ending with a non-empty user
turn, non-empty responses that differ even when whitespace is ignored.

Scores are numbers or numeric text ("4"). Missing or non-numeric scores are `bad_score` unless `score_fill`
is set: "min" / "mean" fill them with the min / mean of the same objective's valid scores for the same
prompt, a number fills them with that number.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Literal

from mallows_ray.data.rejects import (
    BAD_FIELD,
    BAD_MESSAGES,
    BAD_SCORE,
    EMPTY_PROMPT,
    EMPTY_RESPONSE,
    IDENTICAL_RESPONSES,
    LENGTH_MISMATCH,
    MISSING_FIELD,
    TOO_FEW_RESPONSES,
    raw_excerpt,
)
from mallows_ray.data.schema import Message

ROLES = ("system", "user", "assistant")
SCORE_FILLS = ("min", "mean")

ScoreFill = Literal["min", "mean"] | float | None


class RowError(Exception):
    """A row-level validation failure; becomes a Reject."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ScoreSpec:
    """How a normaliser reads scores: which objectives, in which order, and the `score_fill` policy."""

    objectives: list[str] | None  # None: the record's objective names, sorted
    fill: ScoreFill


def check_score_fill(score_fill: Any) -> ScoreFill:
    """`score_fill` itself, or ValueError when it is no policy (module docstring)."""
    number = isinstance(score_fill, (int, float)) and not isinstance(score_fill, bool) and math.isfinite(score_fill)
    if score_fill is not None and score_fill not in SCORE_FILLS and not number:
        raise ValueError(f"score_fill={score_fill!r}; valid: None, 'min', 'mean' or a finite number")
    return score_fill


def describe(value: Any) -> str:
    """`type excerpt`, e.g. `int 5`, `str 'hi'`, for error details."""
    return f"{type(value).__name__} {raw_excerpt(repr(value) if isinstance(value, str) else value, 60)}"


def required(record: dict[str, Any], key: str, where: str = "") -> Any:
    """`record[key]`, or a missing_field RowError when it is absent or null (`where`: the path to `record`
    in the row, e.g. "completions[2].")."""
    value = record.get(key)
    if value is None:
        raise RowError(MISSING_FIELD, f"no {where}{key!r} field (has: {', '.join(sorted(record))})")
    return value


def text_field(record: dict[str, Any], key: str, where: str = "") -> str:
    """`record[key]` as text, else a RowError."""
    value = required(record, key, where)
    if not isinstance(value, str):
        raise RowError(BAD_FIELD, f"{where}{key!r} is {describe(value)}; expected text")
    return value


def response_list(record: dict[str, Any], key: str) -> list:
    """`record[key]` as a list of >= 2 items (a listwise record's responses), else a RowError."""
    value = required(record, key)
    if not isinstance(value, list):
        raise RowError(BAD_FIELD, f"{key!r} is {describe(value)}; expected a list")
    if len(value) < 2:
        raise RowError(TOO_FEW_RESPONSES, f"{key!r} has {len(value)} response(s); a listwise record needs >= 2")
    return value


def message_list(value: Any, where: str) -> list[Message]:
    """`value` as a non-empty list of {role, content} messages, else a bad_messages RowError."""
    if not isinstance(value, list) or not value:
        raise RowError(BAD_MESSAGES, f"{where} is {describe(value)}; expected a non-empty list of {{role, content}}")
    messages: list[Message] = []
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)):
            detail = f"{where}[{i}] is {describe(message)}; a message needs a role in {ROLES} and text content"
            raise RowError(BAD_MESSAGES, detail)
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def prompt_messages(record: dict[str, Any]) -> list[Message]:
    """`prompt` as text (one user turn) or as a message list."""
    prompt = required(record, "prompt")
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else message_list(prompt, "prompt")


def squash(text: str) -> str:
    """`text` with each run of whitespace one space: texts that differ only in whitespace are the same."""
    return " ".join(text.split())


def check_prompt(prompt: list[Message]) -> None:
    """The prompt ends with a non-empty user turn."""
    role = prompt[-1]["role"]
    if role != "user":
        raise RowError(BAD_MESSAGES, f"the prompt's last message has role {role!r}; it must end with a user turn")
    if not prompt[-1]["content"].strip():
        raise RowError(EMPTY_PROMPT, "the prompt's last user message is empty")


def check_responses(responses: list[str], kind: str) -> None:
    """Every response is non-empty and differs from the others even when whitespace is ignored (`kind` names
    them in the detail: chosen / rejected, or responses[i])."""
    names = ["chosen", "rejected"] if kind == "pairwise" else [f"responses[{i}]" for i in range(len(responses))]
    seen: dict[str, int] = {}
    for i, response in enumerate(responses):
        if not response.strip():
            raise RowError(EMPTY_RESPONSE, f"{names[i]} is empty or whitespace-only")
        first = seen.setdefault(squash(response), i)
        if first != i:
            raise RowError(IDENTICAL_RESPONSES, f"{names[i]} is identical to {names[first]}: nothing to prefer")


def score_value(value: Any) -> float | None:
    """A finite float from a number or numeric text ("4"); None for anything else ("N/A", NaN, null, ...)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:  # an integer beyond the float range
            return None
        return value if math.isfinite(value) else None
    return None


def fill_scores(raw: list[Any], fill: ScoreFill, where: str) -> list[float]:
    """Scores as floats, with the invalid ones filled per `fill` (per prompt) or rejected as bad_score."""
    values = [score_value(v) for v in raw]
    bad = [i for i, v in enumerate(values) if v is None]
    if not bad:
        return values
    if fill is None:
        raise RowError(
            BAD_SCORE,
            f"{where}, response {bad[0]}: {raw[bad[0]]!r} is not a finite number (set data.score_fill to "
            "min, mean or a number to fill missing scores)",
        )
    valid = [v for v in values if v is not None]
    if fill in SCORE_FILLS and not valid:
        raise RowError(BAD_SCORE, f"{where}: no valid score to take the {fill} of ({raw_excerpt(raw, 80)})")
    try:
        replacement = {"min": min, "mean": statistics.fmean}[fill](valid) if fill in SCORE_FILLS else float(fill)
    except OverflowError:  # the mean of huge scores overflows
        raise RowError(BAD_SCORE, f"{where}: the {fill} of the valid scores overflows a float") from None
    return [replacement if v is None else v for v in values]


def score_table(table: Any, n: int, spec: ScoreSpec, where: str) -> tuple[list[str], list[list[float]]]:
    """(objective names, [K][N] scores) from {objective: [N scores]}."""
    if not isinstance(table, dict) or not table:
        raise RowError(BAD_FIELD, f"{where} is {describe(table)}; expected {{objective: [{n} numbers]}}")
    names = list(spec.objectives) if spec.objectives else sorted(table)
    scores = []
    for name in names:
        column = table.get(name)
        if column is None:
            raise RowError(MISSING_FIELD, f"{where} has no objective {name!r} (has: {', '.join(sorted(table))})")
        if not isinstance(column, list):
            raise RowError(BAD_SCORE, f"{where}[{name!r}] is {describe(column)}; expected a list of {n} numbers")
        if len(column) != n:
            raise RowError(LENGTH_MISMATCH, f"{where}[{name!r}] has {len(column)} scores for {n} responses")
        scores.append(fill_scores(column, spec.fill, f"{where}[{name!r}]"))
    return names, scores
