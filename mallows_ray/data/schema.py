"""The normalised schema: what every row of every format becomes (`normalise.py`).

One record per prompt (`NormalisedRecord`; in Arrow, `NORMALISED_SCHEMA`):
    id          the record's own `id` / `prompt_id`, else "<name>:<row>" where name is the file's path under
                the folder read (its basename for a single file or dataset); unique within one dataset (a
                repeat is a `duplicate_id` reject)
    kind        "pairwise" (responses = [chosen, rejected]) or "listwise" (the N responses)
    prompt      [{role, content}] with roles system/user/assistant, ending with a user turn
    responses   list of N >= 2 non-empty texts, distinct even when whitespace is ignored
    objectives  listwise: objective names, sorted or in the order of `objectives`; pairwise: [] or, when
                ultrafeedback_binarized rows carry scores, ["score"]
    scores      [K][N] floats aligned with objectives and responses ([[score_chosen, score_rejected]] for
                scored ultrafeedback_binarized; [] for other pairwise rows)
    source, row where the row came from (`sources.py`: row numbers)
"""

from __future__ import annotations

from typing import Literal, TypedDict

import pyarrow as pa


class Message(TypedDict):
    role: str  # system | user | assistant
    content: str


class NormalisedRecord(TypedDict):
    """One prompt and its responses; see the module docstring for each field."""

    id: str
    kind: Literal["pairwise", "listwise"]
    prompt: list[Message]
    responses: list[str]
    objectives: list[str]
    scores: list[list[float]]
    source: str
    row: int


NORMALISED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("kind", pa.string()),
        pa.field("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        pa.field("responses", pa.list_(pa.string())),
        pa.field("objectives", pa.list_(pa.string())),
        pa.field("scores", pa.list_(pa.list_(pa.float64()))),
        pa.field("source", pa.string()),
        pa.field("row", pa.int64()),
    ]
)
