"""The supported formats, the columns each needs and its kind (pairwise / listwise), and telling a record's
format from its columns.

Formats (`FORMATS`; `detect_format` picks one from a record's columns, see `FORMAT_COLUMNS`)
    pairwise_text            prompt, chosen, rejected as text (prompt may also be a message list)
    pairwise_messages        TRL conversational: prompt, chosen, rejected as message lists
    pairwise_implicit        TRL implicit prompt: chosen, rejected message lists; the shared prefix is the prompt
    hh                       Anthropic HH: chosen, rejected "\\n\\nHuman: ...\\n\\nAssistant: ..." transcripts
    ultrafeedback_binarized  prompt text; chosen, rejected message lists incl. the user turn;
                             optional score_chosen, score_rejected
    listwise                 prompt, responses (N texts), scores {objective: [N numbers]}
    ultrafeedback            raw UltraFeedback: instruction, completions[].response,
                             completions[].annotations[aspect].Rating ("1".."5" or "N/A")

Each format's normaliser is in `normalisers.py`.
"""

from __future__ import annotations

import re
from typing import Any

FORMATS = (
    "pairwise_text", "pairwise_messages", "pairwise_implicit", "hh", "ultrafeedback_binarized", "listwise",
    "ultrafeedback",
)
FORMAT_COLUMNS = {
    "pairwise_text": "prompt (text or messages), chosen (text), rejected (text)",
    "pairwise_messages": "prompt (messages), chosen (messages), rejected (messages)",
    "pairwise_implicit": "chosen (messages), rejected (messages), no prompt: the shared prefix is the prompt",
    "hh": "chosen (text), rejected (text) as '\\n\\nHuman: ...\\n\\nAssistant: ...' transcripts, no prompt",
    "ultrafeedback_binarized": "prompt (text), chosen (messages incl. the user turn), rejected (messages), "
    "optional score_chosen / score_rejected",
    "listwise": "prompt (text or messages), responses (N texts), scores ({objective: [N numbers]})",
    "ultrafeedback": "instruction (text), completions ([{response, annotations: {aspect: {Rating}}}])",
}
KINDS = {fmt: "listwise" if fmt in ("listwise", "ultrafeedback") else "pairwise" for fmt in FORMATS}
HH_TURN = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")


class FormatError(ValueError):
    """An unknown format name, or a record whose columns match no format."""


def detect_format(record: dict[str, Any]) -> str:
    """The format whose signature columns the record has (non-null); FormatError when none matches."""

    def has(key: str) -> bool:
        return record.get(key) is not None

    if has("instruction") and has("completions"):
        return "ultrafeedback"
    if has("prompt") and has("responses"):
        return "listwise"
    if has("chosen") and has("rejected"):
        chosen, prompt = record["chosen"], record.get("prompt")
        if isinstance(chosen, list):
            if prompt is None:
                return "pairwise_implicit"
            return "ultrafeedback_binarized" if isinstance(prompt, str) else "pairwise_messages"
        if isinstance(chosen, str) and prompt is not None:
            return "pairwise_text"
        if isinstance(chosen, str) and HH_TURN.search(chosen):
            return "hh"
    formats = "".join(f"\n  {fmt}: {columns}" for fmt, columns in FORMAT_COLUMNS.items())
    raise FormatError(
        f"cannot tell the format of a record with columns {sorted(record)}; the formats and the columns each "
        f"needs:{formats}\n(or name the format explicitly: data.format)"
    )


def check_format(fmt: str) -> str:
    """`fmt` itself ("auto" or one of FORMATS), or FormatError."""
    if fmt != "auto" and fmt not in FORMATS:
        raise FormatError(f"unknown format {fmt!r}; valid: auto, {', '.join(FORMATS)}")
    return fmt


def check_kinds(formats: dict[str, str]) -> None:
    """Every source of one dataset must be of the same kind (pairwise or listwise): {source: format}."""
    seen: dict[str, str] = {}
    for source, fmt in formats.items():
        for other, other_fmt in seen.items():
            if KINDS[other_fmt] != KINDS[fmt]:
                raise FormatError(
                    f"{source} is {fmt} ({KINDS[fmt]}) but {other} is {other_fmt} "
                    f"({KINDS[other_fmt]}): one dataset must be all pairwise or all listwise"
                )
        seen[source] = fmt
