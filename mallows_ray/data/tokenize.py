"""Tokenization of normalised preference records: chat template, truncation, response label masks.

A record is one prompt (a list of chat messages) and its N responses. The prompt is rendered with the
tokenizer's chat template and a generation prompt (plain "Role: text" concatenation when the tokenizer has
no template); each response is tokenized on its own and followed by EOS, which closes the assistant turn in
ChatML-style templates. Truncation: the prompt keeps its END (the latest turns matter most), a response keeps
its START. A prompt that leaves no room for a response under `max_length` is a reject (`prompt_too_long`),
never silently cut; so is a record two of whose different responses become the same tokens once truncated
(`identical_after_truncation`): the pair would have nothing to prefer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from mallows_ray.data.rejects import IDENTICAL_AFTER_TRUNCATION, PROMPT_TOO_LONG


@dataclass(frozen=True)
class LengthLimits:
    max_prompt_length: int = 512
    max_response_length: int = 512
    max_length: int | None = None  # prompt + response; default: the sum of the two above

    @property
    def total(self) -> int:
        return self.max_length or self.max_prompt_length + self.max_response_length


@functools.lru_cache(maxsize=4)
def cached_tokenizer(path: str):
    """One tokenizer per worker process: Ray Data calls the tokenize function once per batch."""
    from mallows_ray.models import load_tokenizer

    return load_tokenizer(path)


def render_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Prompt token ids ending where the assistant's answer starts."""
    if tokenizer.chat_template:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        # transformers 5 returns a BatchEncoding here; older versions a plain list
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant: "
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def tokenize_record(tokenizer, record: dict[str, Any], limits: LengthLimits) -> dict[str, Any]:
    """Token ids of one record, with truncation flags; `reject_reason` is set instead when it cannot fit.

    Returns the record's fields plus:
      prompt_ids          list[int]          (truncated, keep-end)
      response_ids        list[list[int]]    N responses, each + EOS (truncated, keep-start)
      prompt_truncated    bool
      response_truncated  list[bool]
      reject_reason       str ("" when the record is usable), reject_detail str
    """
    prompt_ids = render_prompt_ids(tokenizer, record["prompt"])
    out = dict(record, reject_reason="", reject_detail="")
    prompt_truncated = len(prompt_ids) > limits.max_prompt_length
    prompt_ids = prompt_ids[-limits.max_prompt_length:]
    room = min(limits.max_response_length, limits.total - len(prompt_ids))
    if room < 1:
        out.update(prompt_ids=[], response_ids=[], prompt_truncated=prompt_truncated, response_truncated=[])
        out.update(
            reject_reason=PROMPT_TOO_LONG,
            reject_detail=f"prompt has {len(prompt_ids)} tokens after truncation; max_length={limits.total} "
            "leaves no room for a response",
        )
        return out
    eos = [tokenizer.eos_token_id]
    encoded = tokenizer(list(record["responses"]), add_special_tokens=False)["input_ids"]
    responses = [ids + eos for ids in encoded]
    response_ids = [ids[:room] for ids in responses]
    out.update(
        prompt_ids=prompt_ids,
        response_ids=response_ids,
        prompt_truncated=prompt_truncated,
        response_truncated=[len(ids) > room for ids in responses],
    )
    seen: dict[tuple[int, ...], int] = {}
    for i, ids in enumerate(response_ids):
        first = seen.setdefault(tuple(ids), i)
        if first != i:  # the texts differ (normalising rejects identical texts): the truncation made them one
            how = (f"once truncated to the {room} tokens the prompt leaves (max_response_length="
                   f"{limits.max_response_length}, max_length={limits.total})" if len(ids) == room
                   else "(the tokenizer maps both texts to the same tokens)")
            out.update(reject_reason=IDENTICAL_AFTER_TRUNCATION,
                       reject_detail=f"responses {first} and {i} are the same {len(ids)} tokens {how}: "
                       "nothing to prefer")
            break
    return out


def tokenize_batch(rows: list[dict[str, Any]], *, tokenizer_path: str, limits: LengthLimits) -> list[dict[str, Any]]:
    tokenizer = cached_tokenizer(tokenizer_path)
    return [tokenize_record(tokenizer, row, limits) for row in rows]


def conditioned_prompt_ids(tokenizer, messages: list[dict[str, str]], prompt_ids: list[int], lam, objectives,
                           *, placement: str = "system") -> list[int]:
    """The policy's prompt ids with lambda rendered in (ALGORITHMS 3.1), next to the reference's `prompt_ids`.

    `prompt_ids` is the tokenized, possibly keep-end-truncated, unconditioned prompt. The conditioned rendering
    C and the unconditioned one U share a head H and a tail T; C = H + L + T, where L carries the weights line
    (U = H + M + T; M is e.g. a template's default system prompt, or nothing). The weights line is never cut off:
    - the line before the conversation (`system`, `user_prefix`; H = the template's opening, T = the
      conversation): the result keeps H + L and as much of T as `prompt_ids` kept of U, so a truncated prompt
      is truncated at the same place; its length is len(prompt_ids) + len(L) - len(M) when untruncated;
    - the line after it (`user_suffix`; H = the conversation, T = the end of the turn): `prompt_ids` with its
      M + T replaced by C's L + T, so the policy sees what the reference saw plus the line.
    """
    from mallows_ray.lambdas.vectors import condition_messages

    conditioned = render_prompt_ids(tokenizer, condition_messages(messages, lam, objectives, placement=placement))
    plain = render_prompt_ids(tokenizer, messages)
    head = 0
    while head < min(len(conditioned), len(plain)) and conditioned[head] == plain[head]:
        head += 1
    tail = 0
    while tail < min(len(conditioned), len(plain)) - head and conditioned[-1 - tail] == plain[-1 - tail]:
        tail += 1
    after = len(plain) - head  # U's M + T (M: the turn's last token(s) when the line's blank line merges with them)
    if placement == "user_suffix":  # the line and the turn's end whole, after what the reference kept before them
        return prompt_ids[: max(0, len(prompt_ids) - after)] + conditioned[head:]
    kept_tail = min(tail, len(prompt_ids))  # how much of the shared tail survived the truncation
    return conditioned[: len(conditioned) - tail] + (conditioned[len(conditioned) - kept_tail:] if kept_tail else [])
