"""Lambda-conditioned generation from an exported model (ALGORITHMS 3.1).

A listwise run's export records how it conditioned prompts (`lambda_conditioning.json`: objectives and
where the weights line goes). `generate` renders a user's lambda into the prompt with the same renderer, so a
different lambda steers the same weights without retraining.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from mallows_ray.data.tokenize import render_prompt_ids
from mallows_ray.lambdas.vectors import condition_messages

Messages = list[dict[str, str]]


def as_messages(prompt: str | Messages) -> Messages:
    """A prompt as chat messages: a plain string is one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def read_prompts(path: str | Path) -> list[str | Messages]:
    """Prompts from a file: .jsonl with a `prompt` field (text or messages) per line, else one prompt per line."""
    path = Path(path)
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for number, line in enumerate(lines, 1):
        record = json.loads(line)
        if not isinstance(record, dict) or "prompt" not in record:
            raise ValueError(f"{path}:{number}: expected a JSON object with a `prompt` field, got {line[:80]!r}")
        prompts.append(record["prompt"])
    return prompts


def prompt_ids(tokenizer, prompt: str | Messages, lam: Sequence[float] | None,
               conditioning: dict[str, Any] | None) -> list[int]:
    """The prompt's token ids, with lambda rendered in as in training when `lam` is given."""
    messages = as_messages(prompt)
    if lam is not None:
        if conditioning is None or not conditioning.get("condition", True):
            raise ValueError("this model was not trained with lambda conditioning (its export has no "
                             "lambda_conditioning.json, or condition was off); generate without --lambda")
        messages = condition_messages(messages, lam, conditioning["objectives"],
                                      placement=conditioning["placement"])
    return render_prompt_ids(tokenizer, messages)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def generate(model, tokenizer, prompts: Sequence[str | Messages], *, lam: Sequence[float] | None = None,
             conditioning: dict[str, Any] | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, batch_size: int = 8, seed: int = 0) -> list[str]:
    """One response per prompt (greedy when temperature is 0), batched with left padding."""
    torch.manual_seed(seed)
    responses: list[str] = []
    sampling = ({"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0
                else {"do_sample": False})
    for chunk in _chunks(list(prompts), batch_size):
        ids = [prompt_ids(tokenizer, prompt, lam, conditioning) for prompt in chunk]
        width = max(map(len, ids))
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(row)) + row for row in ids])  # [B, T]
        attention = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids])
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device),
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
        responses += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [response.strip() for response in responses]
