"""Rejected rows: the fixed set of reason codes, the rejects file, its summary and the bad-fraction gate.

Every row that does not become a normalised record becomes a `Reject` with one reason code from `REASONS`;
nothing is dropped silently. `RejectsFile` writes them to a jsonl file (one object per reject:
source, row, reason, detail, raw), and `check_bad_fraction` stops a run whose share of rejects exceeds the
configured `max_bad_fraction`, with a message that says why and where to look.

A reject's text fields are always valid UTF-8 (lone surrogates are written as `\\udXXX` escapes) and its
detail is at most DETAIL_CHARS long, so whatever a row held, the rejects file can be written and read back.

Row numbers follow the reader: the 1-based line number for jsonl / jsonl.gz files, the 0-based row index
for parquet files and Hugging Face datasets.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

UNDECODABLE = "undecodable"
MISSING_FIELD = "missing_field"
BAD_FIELD = "bad_field"
BAD_MESSAGES = "bad_messages"
EMPTY_PROMPT = "empty_prompt"
EMPTY_RESPONSE = "empty_response"
IDENTICAL_RESPONSES = "identical_responses"
TOO_FEW_RESPONSES = "too_few_responses"
LENGTH_MISMATCH = "length_mismatch"
BAD_SCORE = "bad_score"
DUPLICATE_ID = "duplicate_id"
PROMPT_TOO_LONG = "prompt_too_long"
DAMAGED_FILE = "damaged_file"
INVALID_UNICODE = "invalid_unicode"
OBJECTIVE_MISMATCH = "objective_mismatch"
IDENTICAL_AFTER_TRUNCATION = "identical_after_truncation"
NORMALISER_ERROR = "normaliser_error"

REASONS: dict[str, str] = {
    UNDECODABLE: "the line/row could not be read: bad JSON, bad UTF-8, a corrupt gzip member, or JSON that "
    "is not an object",
    MISSING_FIELD: "a field the format needs is absent or null (e.g. `rejected`, an objective's scores)",
    BAD_FIELD: "a field has the wrong type (e.g. a number or list where text is expected)",
    BAD_MESSAGES: "a chat message list is malformed: not a list of {role, content} with roles "
    "system/user/assistant, no shared prompt ending with a user turn, or no single final assistant reply",
    EMPTY_PROMPT: "the prompt's last user message is empty or whitespace-only",
    EMPTY_RESPONSE: "a response is empty or whitespace-only",
    IDENTICAL_RESPONSES: "two responses of the same prompt are identical (e.g. chosen == rejected)",
    TOO_FEW_RESPONSES: "a listwise record has fewer than 2 responses",
    LENGTH_MISMATCH: "an objective's score list does not have one score per response",
    BAD_SCORE: "a score is missing, non-numeric, NaN or infinite and no `score_fill` policy is set",
    DUPLICATE_ID: "the record's id was already used by an earlier record of the same dataset",
    PROMPT_TOO_LONG: "(tokenizer stage) the prompt leaves no room for a response under max_length",
    DAMAGED_FILE: "the row's file cannot be read to its end (a truncated or corrupt gzip stream, a broken "
    "parquet footer or page): the whole file is rejected, every row read from it and the unreadable rest "
    "(one reject per unread row where the file records how many, else one for the rest)",
    INVALID_UNICODE: "a text holds a lone UTF-16 surrogate (e.g. a \\ud800 escape in the JSON), which is not "
    "valid Unicode and cannot be stored or tokenized",
    OBJECTIVE_MISMATCH: "a listwise row scores objectives that the other rows do not (set data.objectives to "
    "pick the ones to train on)",
    IDENTICAL_AFTER_TRUNCATION: "(tokenizer stage) two responses differ only after max_response_length / "
    "max_length tokens, so the truncated pair has nothing to prefer",
    NORMALISER_ERROR: "the normaliser failed on the row in an unforeseen way (a bug: please report it with "
    "the row); the row is rejected instead of the run stopping",
}

RAW_EXCERPT_CHARS = 500
DETAIL_CHARS = 1000
N_EXAMPLES = 3


@dataclass(frozen=True)
class Reject:
    """One bad row: where it is, why it was rejected, and a truncated copy of what it held."""

    source: str  # file path, save_to_disk folder[/split] or hub dataset name/split
    row: int  # 1-based line number (jsonl), 0-based row index (parquet, HF datasets)
    reason: str  # one of REASONS
    detail: str  # what is wrong, naming the field and what would be valid
    raw: str = ""  # the record (or undecodable line), truncated to RAW_EXCERPT_CHARS

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown reject reason {self.reason!r}; valid: {', '.join(REASONS)}")
        # frozen dataclass: object.__setattr__ is the documented way to set fields in __post_init__
        object.__setattr__(self, "source", utf8_safe(self.source))
        object.__setattr__(self, "detail", utf8_safe(_truncate(self.detail, DETAIL_CHARS)))
        object.__setattr__(self, "raw", utf8_safe(self.raw))

    def describe(self) -> str:
        """`file:row reason detail`, the one-line form used in messages."""
        return f"{self.source}:{self.row} {self.reason} {self.detail}"


class DataValidationError(ValueError):
    """Too many rows were rejected (more than `max_bad_fraction` allows)."""


def utf8_safe(text: str) -> str:
    """`text` with lone surrogates (not encodable as UTF-8) replaced by `\\udXXX` escapes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more chars]"


def raw_excerpt(value: Any, limit: int = RAW_EXCERPT_CHARS) -> str:
    """A short text copy of a record (as JSON) or of a raw line, for the rejects file; never raises."""
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (RecursionError, ValueError, TypeError) as err:  # nesting too deep for the encoder
            text = f"<a {type(value).__name__} that cannot be shown: {type(err).__name__}>"
    return utf8_safe(_truncate(text, limit))


class RejectsFile:
    """The rejects file written as rejects come (`add`), one JSON object per reject ({source, row, reason,
    detail, raw}); counts by reason kept as it goes. A context manager: the file exists, empty when no
    reject came, once the block is left."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.by_reason: Counter = Counter()
        self._fh = open(self.path, "w", encoding="utf-8")

    def add(self, reject: Reject) -> None:
        self._fh.write(json.dumps(asdict(reject), ensure_ascii=False) + "\n")
        self.by_reason[reject.reason] += 1

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "RejectsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def summarise_rejects(rejects: Iterable[Reject]) -> dict[str, int]:
    """Counts by reason code, sorted by code."""
    return dict(sorted(Counter(r.reason for r in rejects).items()))


def read_rejects(path: str | Path) -> list[Reject]:
    """The rejects a `RejectsFile` wrote."""
    with open(path, encoding="utf-8") as fh:
        return [Reject(**json.loads(line)) for line in fh if line.strip()]


def _examples(rejects: list[Reject], n: int = N_EXAMPLES) -> list[Reject]:
    """n rejects covering as many reasons as possible: the first of each reason, then the next ones."""
    first: dict[str, Reject] = {}
    for reject in rejects:
        first.setdefault(reject.reason, reject)
    picked = list(first.values())[:n]
    return picked + [r for r in rejects if r not in picked][: n - len(picked)]


def check_bad_fraction(n_bad: int, n_total: int, max_bad_fraction: float, rejects_path: str | Path) -> None:
    """Raise DataValidationError when n_bad / n_total exceeds max_bad_fraction (default policy: 0.0).

    The message gives the fraction against the allowed one, the counts by reason and three example rejects
    (of different reasons where there are), both read back from `rejects_path` (written by a `RejectsFile`
    first), and that file's path.
    """
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction={max_bad_fraction!r}: must be a number in [0, 1]")
    fraction = n_bad / n_total if n_total else 0.0
    if fraction <= max_bad_fraction:
        return
    try:
        rejects = read_rejects(rejects_path)
    except (OSError, ValueError, TypeError) as err:
        by_reason, examples = f"(could not read {rejects_path}: {err})", []
    else:
        by_reason = ", ".join(f"{reason}={count}" for reason, count in summarise_rejects(rejects).items())
        examples = [r.describe() for r in _examples(rejects)]
    raise DataValidationError(
        f"{n_bad} of {n_total} rows rejected ({fraction:.2%}), more than max_bad_fraction={max_bad_fraction} "
        f"({max_bad_fraction:.2%}) allows.\n  by reason: {by_reason}\n  rejects file: {rejects_path}\n"
        + "".join(f"  e.g. {example}\n" for example in examples)
        + "Fix these rows, or raise data.max_bad_fraction to train on the rows that are valid."
    )
