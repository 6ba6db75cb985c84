"""One normaliser per format (`detect.FORMATS`): a raw record -> `Parts` (the prompt's messages, the
responses and, for scored formats, objective names and [K][N] scores), or `fields.RowError`. The id and the
checks every record passes are added by `normalise.py`.

Shared prompts (pairwise_messages, pairwise_implicit, hh, ultrafeedback_binarized): chosen and rejected are
compared turn by turn (whitespace-insensitively); the prompt is their longest common run of turns that ends
with a user turn and is followed by an assistant turn in both. For message lists exactly one assistant
message must follow. For HH transcripts the response is all the text after that assistant marker, so a
reply that itself contains "\\n\\nHuman:" / "\\n\\nAssistant:" (it happens in the real data) is kept whole
rather than misread as more dialogue; turn texts are stripped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from mallows_ray.data.detect import HH_TURN
from mallows_ray.data.fields import (
    RowError,
    ScoreSpec,
    check_prompt,
    describe,
    message_list,
    prompt_messages,
    required,
    response_list,
    score_table,
    squash,
    text_field,
)
from mallows_ray.data.rejects import BAD_FIELD, BAD_MESSAGES, MISSING_FIELD
from mallows_ray.data.schema import Message

_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class Parts(NamedTuple):
    """What a normaliser reads from a record; `normalise.py` makes it a `NormalisedRecord`."""

    prompt: list[Message]
    responses: list[str]
    objectives: Sequence[str] = ()
    scores: Sequence[list[float]] = ()


def shared_prompt_length(chosen: list[Message], rejected: list[Message]) -> int:
    """The largest k such that chosen[:k] == rejected[:k] (ignoring whitespace) ends with a user turn and
    both continue with an assistant turn."""
    same = 0
    while (
        same < min(len(chosen), len(rejected))
        and chosen[same]["role"] == rejected[same]["role"]
        and squash(chosen[same]["content"]) == squash(rejected[same]["content"])
    ):
        same += 1
    for k in range(min(same, len(chosen) - 1, len(rejected) - 1), 0, -1):
        if chosen[k - 1]["role"] == "user" and chosen[k]["role"] == rejected[k]["role"] == "assistant":
            return k
    raise RowError(
        BAD_MESSAGES,
        f"chosen and rejected share no prompt ending with a user turn and followed by an assistant reply in both "
        f"(they agree on their first {same} turn(s))",
    )


def split_messages(chosen: list[Message], rejected: list[Message]) -> Parts:
    """Shared prompt + the single assistant reply that follows it in chosen and in rejected."""
    k = shared_prompt_length(chosen, rejected)
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if len(messages) != k + 1:
            raise RowError(
                BAD_MESSAGES,
                f"{name} has {len(messages) - k} messages after the shared prompt; expected one assistant reply",
            )
    return Parts(chosen[:k], [chosen[k]["content"], rejected[k]["content"]])


def hh_turns(text: str, key: str) -> tuple[list[Message], list[int]]:
    """The transcript's turns as messages, and the offset in `text` where each turn's content starts."""
    marks = list(HH_TURN.finditer(text))
    if not marks or text[: marks[0].start()].strip():
        raise RowError(
            BAD_MESSAGES, f"{key!r} is not a '\\n\\nHuman: ...\\n\\nAssistant: ...' transcript (starts {text[:40]!r})"
        )
    ends = [mark.start() for mark in marks[1:]] + [len(text)]
    messages: list[Message] = [
        {"role": _HH_ROLES[mark.group(1)], "content": text[mark.end(): end].strip()}
        for mark, end in zip(marks, ends, strict=True)
    ]
    return messages, [mark.end() for mark in marks]


def _pairwise_text(record: dict[str, Any], spec: ScoreSpec) -> Parts:
    return Parts(prompt_messages(record), [text_field(record, "chosen"), text_field(record, "rejected")])


def _pairwise_messages(record: dict[str, Any], spec: ScoreSpec) -> Parts:
    prompt = prompt_messages(record)
    check_prompt(prompt)  # before the split, whose error would otherwise blame chosen / rejected
    chosen = message_list(required(record, "chosen"), "chosen")
    rejected = message_list(required(record, "rejected"), "rejected")
    return split_messages(prompt + chosen, prompt + rejected)


def _pairwise_implicit(record: dict[str, Any], spec: ScoreSpec) -> Parts:
    return split_messages(
        message_list(required(record, "chosen"), "chosen"), message_list(required(record, "rejected"), "rejected")
    )


def _hh(record: dict[str, Any], spec: ScoreSpec) -> Parts:
    chosen_text, rejected_text = text_field(record, "chosen"), text_field(record, "rejected")
    chosen, chosen_at = hh_turns(chosen_text, "chosen")
    rejected, rejected_at = hh_turns(rejected_text, "rejected")
    k = shared_prompt_length(chosen, rejected)
    return Parts(chosen[:k], [chosen_text[chosen_at[k]:].strip(), rejected_text[rejected_at[k]:].strip()])


def _ultrafeedback_binarized(record: dict[str, Any], spec: ScoreSpec) -> Parts:
    """The user turn inside chosen/rejected is the prompt; scores, when given, become objective "score"."""
    parts = _pairwise_implicit(record, spec)
    pair = [record.get("score_chosen"), record.get("score_rejected")]
    if pair == [None, None]:
        return parts
    objectives, scores = score_table({"score": pair}, 2, ScoreSpec(None, spec.fill), "score_chosen/score_rejected")
    return parts._replace(objectives=objectives, scores=scores)


def _listwise(record: dict[str, Any], spec: ScoreSpec) -> Parts:
    prompt = prompt_messages(record)
    responses = response_list(record, "responses")
    for i, response in enumerate(responses):
        if not isinstance(response, str):
            raise RowError(BAD_FIELD, f"responses[{i}] is {describe(response)}; expected text")
    objectives, scores = score_table(required(record, "scores"), len(responses), spec, "scores")
    return Parts(prompt, responses, objectives, scores)


def _ultrafeedback(record: dict[str, Any], spec: ScoreSpec) -> Parts:
    prompt: list[Message] = [{"role": "user", "content": text_field(record, "instruction")}]
    completions = response_list(record, "completions")
    responses, ratings = [], {}
    for i, completion in enumerate(completions):
        if not isinstance(completion, dict):
            raise RowError(BAD_FIELD, f"completions[{i}] is {describe(completion)}; expected an object")
        responses.append(text_field(completion, "response", f"completions[{i}]."))
        annotations = completion.get("annotations") or {}
        if not isinstance(annotations, dict):
            detail = f"completions[{i}].annotations is {describe(annotations)}; expected {{aspect: {{Rating}}}}"
            raise RowError(BAD_FIELD, detail)
        for aspect, note in annotations.items():
            rating = note.get("Rating") if isinstance(note, dict) else None
            ratings.setdefault(aspect, [None] * len(completions))[i] = rating
    if not ratings:
        raise RowError(MISSING_FIELD, "no completion has annotations[aspect].Rating")
    objectives, scores = score_table(ratings, len(responses), spec, "annotations Rating")
    return Parts(prompt, responses, objectives, scores)


NORMALISERS: dict[str, Callable[[dict[str, Any], ScoreSpec], Parts]] = {
    "pairwise_text": _pairwise_text,
    "pairwise_messages": _pairwise_messages,
    "pairwise_implicit": _pairwise_implicit,
    "hh": _hh,
    "ultrafeedback_binarized": _ultrafeedback_binarized,
    "listwise": _listwise,
    "ultrafeedback": _ultrafeedback,
}
