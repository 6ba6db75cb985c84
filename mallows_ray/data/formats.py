"""Readers and normalisers: preference data in any supported format -> one pairwise/listwise schema.

Sources (`iter_raw_rows`, `list_source_files`)
    * a .jsonl, .jsonl.gz or .parquet file (any case of the suffix), or a folder of them (searched
      recursively, read in sorted path order; its other files are named in a SkippedFilesWarning);
    * a Hugging Face `datasets` folder written by `save_to_disk` (a Dataset: dataset_info.json + state.json;
      a DatasetDict: dataset_dict.json, pick one with `split`);
    * otherwise a Hugging Face hub dataset name, loaded with `datasets.load_dataset` when the hub is
      reachable.
    Row numbers: the 1-based line number for jsonl / jsonl.gz (blank lines are skipped but counted), the
    0-based row index for parquet files and Hugging Face datasets. Undecodable lines come out as rows with
    `error` set (invalid JSON or UTF-8, nesting too deep to parse, a parquet row Arrow cannot convert), and
    a file that stops being readable (a corrupt or truncated gzip stream, a broken parquet footer or page)
    ends with `damaged` rows: one per unread row where the parquet footer gives the count, else one for
    the unknown rest. A reader never raises in the middle of a file; `read_normalised` rejects a damaged
    file as a whole (every row read from it too), so a truncated file cannot pass as a few bad rows.

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

Shared prompts (pairwise_messages, pairwise_implicit, hh, ultrafeedback_binarized): chosen and rejected are
compared turn by turn (whitespace-insensitively); the prompt is their longest common run of turns that ends
with a user turn and is followed by an assistant turn in both. For message lists exactly one assistant
message must follow. For HH transcripts the response is all the text after that assistant marker, so a
reply that itself contains "\\n\\nHuman:" / "\\n\\nAssistant:" (it happens in the real data) is kept whole
rather than misread as more dialogue; turn texts are stripped.

Normalised schema (`NormalisedRecord`, `NORMALISED_SCHEMA`): one record per prompt
    id          the record's own `id` / `prompt_id`, else "<name>:<row>" where name is the file's path under
                the folder read (its basename for a single file or dataset); unique within one
                `read_normalised` call (a repeat is a `duplicate_id` reject)
    kind        "pairwise" (responses = [chosen, rejected]) or "listwise" (the N responses)
    prompt      [{role, content}] with roles system/user/assistant, ending with a user turn
    responses   list of N >= 2 non-empty texts, distinct even when whitespace is ignored
    objectives  listwise: objective names, sorted or in the order of `objectives`; pairwise: [] or, when
                ultrafeedback_binarized rows carry scores, ["score"]
    scores      [K][N] floats aligned with objectives and responses ([[score_chosen, score_rejected]] for
                scored ultrafeedback_binarized; [] for other pairwise rows)
    source, row where the row came from (see row numbers above)

Validation: every row that does not normalise becomes a `Reject` with a reason code from
`mallows_ray.data.rejects.REASONS`, whatever it holds (texts with lone surrogates: `invalid_unicode`; so
every record fits NORMALISED_SCHEMA in Arrow). Missing or non-numeric scores are `bad_score` unless `score_fill` is set:
"min" / "mean" fill them with the min / mean of the same objective's valid scores for the same prompt, a
number fills them with that number.
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
import os
import re
import statistics
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypedDict

import pyarrow as pa
import pyarrow.parquet as pq

from mallows_ray.data.rejects import (
    BAD_FIELD,
    BAD_MESSAGES,
    BAD_SCORE,
    DAMAGED_FILE,
    DUPLICATE_ID,
    EMPTY_PROMPT,
    EMPTY_RESPONSE,
    IDENTICAL_RESPONSES,
    INVALID_UNICODE,
    LENGTH_MISMATCH,
    MISSING_FIELD,
    NORMALISER_ERROR,
    OBJECTIVE_MISMATCH,
    PROMPT_TOO_LONG,
    TOO_FEW_RESPONSES,
    UNDECODABLE,
    Reject,
    raw_excerpt,
)

__all__ = [
    "FORMATS", "FORMAT_COLUMNS", "KINDS", "NORMALISED_SCHEMA", "PROMPT_TOO_LONG", "DataSourceError",
    "FormatError", "Message", "NormalisedRecord", "RawRow", "Reject", "SkippedFilesWarning", "SourceUnit",
    "check_kinds", "common_objectives", "detect_format", "duplicate_reject", "iter_raw_rows", "iter_unit_rows",
    "list_source_files", "normalise", "normalise_source", "read_normalised", "source_units",
]

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
ROLES = ("system", "user", "assistant")
SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
SCORE_FILLS = ("min", "mean")
_PARQUET_BATCH_ROWS = 1024
_HH_TURN = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}

ScoreFill = Literal["min", "mean"] | float | None


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


class RawRow(NamedTuple):
    """One row as read: a decoded JSON object / table row, or the reason it could not be decoded."""

    source: str  # file path, save_to_disk folder[/split] or hub dataset name/split
    row: int  # 1-based line number (jsonl), 0-based row index (parquet, HF datasets)
    record: dict[str, Any] | None
    error: str | None = None  # set (and record None) when the row is undecodable
    raw_text: str = ""  # the undecodable line, truncated, for the rejects file
    name: str = ""  # the source in default ids: its path relative to the folder read, else its basename
    damaged: bool = False  # an error row saying the file cannot be read from here on (see DAMAGED_FILE)


class SkippedFilesWarning(UserWarning):
    """A folder source holds files that are not data files and are not read."""


class FormatError(ValueError):
    """An unknown format name, or a record whose columns match no format."""


class DataSourceError(ValueError):
    """A path or dataset name that cannot be read as a source."""


class _RowError(Exception):
    """A row-level validation failure; becomes a Reject."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class _Parts(NamedTuple):
    prompt: list[Message]
    responses: list[str]
    objectives: Sequence[str] = ()
    scores: Sequence[list[float]] = ()


@dataclass(frozen=True)
class _ScoreSpec:
    objectives: list[str] | None  # None: the record's objective names, sorted
    fill: ScoreFill


# ---------------------------------------------------------------------------------------------- sources


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or ((path / "dataset_info.json").is_file() and (path / "state.json").is_file())
    )


def _has_data_suffix(name: str) -> bool:
    return name.lower().endswith(SUFFIXES)  # .JSONL, .Parquet: the case of the suffix does not matter


def _looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or _has_data_suffix(name)


def list_source_files(path: str) -> list[str]:
    """The local files that make up a source, in reading order.

    A data file gives [path]; a folder gives every .jsonl / .jsonl.gz / .parquet file under it (any case of
    the suffix), sorted by path (each one readable on its own with `iter_raw_rows`: the unit of parallel
    reading); the other files of the folder are named in a SkippedFilesWarning. A save_to_disk folder gives
    all of its files (what a content fingerprint hashes; it is read as a whole). A hub dataset name gives [].
    """
    local = Path(path).expanduser()
    if _is_saved_dataset(local):
        return [str(p) for p in sorted(local.rglob("*")) if p.is_file()]
    if local.is_dir():
        every = [p for p in sorted(local.rglob("*")) if p.is_file()]
        files = [str(p) for p in every if _has_data_suffix(p.name)]
        if not files:
            raise DataSourceError(
                f"{path}: folder holds no {' / '.join(SUFFIXES)} files (searched recursively) and is not a "
                "datasets save_to_disk folder (dataset_info.json + state.json, or dataset_dict.json)"
            )
        skipped = [str(p.relative_to(local)) for p in every if not _has_data_suffix(p.name)]
        if skipped:
            shown = ", ".join(skipped[:10]) + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
            warnings.warn(f"{path}: skipping {len(skipped)} file(s) that are not {' / '.join(SUFFIXES)}: {shown}",
                          SkippedFilesWarning)  # one place: shown once per message, however often listed
        return files
    if local.is_file():
        if not _has_data_suffix(local.name):
            raise DataSourceError(f"{path}: unsupported file type; valid: {', '.join(SUFFIXES)}")
        return [str(local)]
    if _looks_local(path):
        raise DataSourceError(f"{path}: no such file or folder")
    return []


class SourceUnit(NamedTuple):
    """One independently readable part of a source, the unit of parallel reading: a data file, or a whole
    save_to_disk / hub dataset (`dataset` set: the path or name, and the DatasetDict split to pick)."""

    path: str  # the data file; for a dataset, the save_to_disk folder or hub name
    name: str  # the file in default ids: its path under the folder read, else its basename
    dataset: bool = False
    split: str | None = None


def source_units(path_or_name: str, *, split: str | None = None) -> list[SourceUnit]:
    """The units of a file, folder, save_to_disk folder or hub dataset, in reading order.

    `split` picks a split of a DatasetDict (save_to_disk or hub); it is an error for local files.
    """
    if _is_saved_dataset(Path(path_or_name).expanduser()):
        return [SourceUnit(str(Path(path_or_name).expanduser()), "", dataset=True, split=split)]
    files = list_source_files(path_or_name)
    if not files:
        return [SourceUnit(path_or_name, "", dataset=True, split=split)]
    if split is not None:
        raise DataSourceError(
            f"split={split!r} applies only to Hugging Face datasets; {path_or_name} is a local file or folder: "
            "point at the split's own file or folder instead"
        )
    root = Path(path_or_name).expanduser()
    return [SourceUnit(file, os.path.relpath(file, root) if root.is_dir() else os.path.basename(file))
            for file in files]


def iter_unit_rows(unit: SourceUnit) -> Iterator[RawRow]:
    """Every row of one unit, in order."""
    if not unit.dataset:
        reader = _iter_parquet if unit.path.lower().endswith(".parquet") else _iter_jsonl
        yield from reader(unit.path, unit.name)
    elif _is_saved_dataset(Path(unit.path)):
        yield from _iter_saved_dataset(Path(unit.path), unit.split)
    else:
        yield from _iter_hub(unit.path, unit.split)


def iter_raw_rows(path_or_name: str, *, split: str | None = None) -> Iterator[RawRow]:
    """Every row of a file, folder, save_to_disk folder or hub dataset, in a deterministic order.

    `split` picks a split of a DatasetDict (save_to_disk or hub); it is an error for local files.
    """
    for unit in source_units(path_or_name, split=split):
        yield from iter_unit_rows(unit)


def _unreadable_rest(path: str, name: str, rows: range, err: Exception) -> Iterator[RawRow]:
    """Damaged-file rows for `rows`, the rows the file has but that cannot be read."""
    for row in rows:
        yield RawRow(path, row, None, f"the file cannot be read from here on ({type(err).__name__}: {err})",
                     name=name, damaged=True)


def _iter_jsonl(path: str, name: str) -> Iterator[RawRow]:
    opener = gzip.open if path.lower().endswith(".gz") else open
    line_no = 0
    try:
        with opener(path, "rb") as fh:
            for line_no, line in enumerate(fh, start=1):
                if line_no == 1:
                    line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark (Windows editors)
                if line.strip():
                    yield _decode_line(path, name, line_no, line)
    except (OSError, EOFError, zlib.error) as err:  # a corrupt or truncated gzip stream, an unreadable file
        # how many lines the rest held is unknown: one row stands for it
        yield from _unreadable_rest(path, name, range(line_no + 1, line_no + 2), err)


def _decode_line(path: str, name: str, line_no: int, line: bytes) -> RawRow:
    try:
        record = json.loads(line)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        error = f"not valid JSON: {err}"
    except RecursionError:
        error = "not readable JSON: nested too deeply for the JSON parser"
    else:
        if isinstance(record, dict):
            return RawRow(path, line_no, record, name=name)
        error = f"a JSON {_JSON_TYPES.get(type(record), type(record).__name__)} where an object {{...}} is expected"
    raw_text = raw_excerpt(line.decode("utf-8", errors="replace").rstrip("\n"))
    return RawRow(path, line_no, None, error, raw_text, name=name)


def _iter_parquet(path: str, name: str) -> Iterator[RawRow]:
    row, total = 0, None
    try:
        file = pq.ParquetFile(path)
        total = file.metadata.num_rows
        for batch in file.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            for record, error in _batch_records(batch):
                yield RawRow(path, row, record, error, name=name)
                row += 1
    except (pa.ArrowException, OSError) as err:  # a broken footer (truncated file) or page
        # the footer, when readable, says how many rows the file has: each unread one is a row
        yield from _unreadable_rest(path, name, range(row, max(total or 0, row + 1)), err)


def _batch_records(batch: pa.RecordBatch) -> Iterator[tuple[dict[str, Any] | None, str | None]]:
    """(record, None) per row of a parquet batch, or (None, error) for a row Arrow cannot turn into Python
    (e.g. a string column holding invalid UTF-8): the batch is retried row by row to find it."""
    try:
        records = batch.to_pylist()
    except (pa.ArrowException, ValueError):
        records = None
    if records is not None:
        yield from ((record, None) for record in records)
        return
    for i in range(batch.num_rows):
        try:
            yield batch.slice(i, 1).to_pylist()[0], None
        except (pa.ArrowException, ValueError) as err:
            yield None, f"the row cannot be read ({type(err).__name__}: {err})"


def _import_datasets():
    try:
        import datasets
    except ImportError as err:
        raise DataSourceError("reading Hugging Face datasets needs the `datasets` package: pip install datasets") \
            from err
    return datasets


def _pick_split(data: dict, split: str | None, where: str) -> tuple[str, Any]:
    """(split name, Dataset) of a DatasetDict; `split` may be None when there is exactly one."""
    if split is None and len(data) == 1:
        split = next(iter(data))
    if split not in data:
        problem = "no split given" if split is None else f"no split {split!r}"
        raise DataSourceError(f"{where}: {problem}; available splits: {', '.join(data)} (set data.split)")
    return split, data[split]


def _iter_saved_dataset(path: Path, split: str | None) -> Iterator[RawRow]:
    datasets = _import_datasets()
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        split, data = _pick_split(data, split, str(path))
        source = str(path / split)
    elif split is not None:
        raise DataSourceError(f"{path} is a single saved Dataset without splits; remove split={split!r}")
    else:
        source = str(path)
    yield from _iter_dataset(source, data)


def _iter_hub(name: str, split: str | None) -> Iterator[RawRow]:
    datasets = _import_datasets()
    try:
        data = datasets.load_dataset(name, split=split)
    except Exception as err:  # hub, network and auth failures come in many exception types
        raise DataSourceError(
            f"{name!r} is not a local file or folder, and loading it from the Hugging Face hub failed: the hub "
            f"is unreachable (offline, HF_HUB_OFFLINE=1, no network) or has no such dataset/split "
            f"({type(err).__name__}: {err}). Give a local path instead: a {' / '.join(SUFFIXES)} file, a folder "
            "of them, or a datasets save_to_disk folder."
        ) from err
    if isinstance(data, datasets.DatasetDict):
        split, data = _pick_split(data, split, name)
    yield from _iter_dataset(f"{name}/{split}", data)


def _iter_dataset(source: str, data) -> Iterator[RawRow]:
    for row, record in enumerate(data):
        yield RawRow(source, row, record, name=os.path.basename(source))


# ---------------------------------------------------------------------------------------------- formats


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
        if isinstance(chosen, str) and _HH_TURN.search(chosen):
            return "hh"
    formats = "".join(f"\n  {fmt}: {columns}" for fmt, columns in FORMAT_COLUMNS.items())
    raise FormatError(
        f"cannot tell the format of a record with columns {sorted(record)}; the formats and the columns each "
        f"needs:{formats}\n(or name the format explicitly: data.format)"
    )


def _check_format(fmt: str) -> str:
    if fmt != "auto" and fmt not in FORMATS:
        raise FormatError(f"unknown format {fmt!r}; valid: auto, {', '.join(FORMATS)}")
    return fmt


def _check_score_fill(score_fill: Any) -> ScoreFill:
    number = isinstance(score_fill, (int, float)) and not isinstance(score_fill, bool) and math.isfinite(score_fill)
    if score_fill is not None and score_fill not in SCORE_FILLS and not number:
        raise ValueError(f"score_fill={score_fill!r}; valid: None, 'min', 'mean' or a finite number")
    return score_fill


def _describe(value: Any) -> str:
    """`type excerpt`, e.g. `int 5`, `str 'hi'`, for error details."""
    return f"{type(value).__name__} {raw_excerpt(repr(value) if isinstance(value, str) else value, 60)}"


def _field(record: dict[str, Any], key: str, where: str = "") -> Any:
    value = record.get(key)
    if value is None:
        raise _RowError(MISSING_FIELD, f"no {where}{key!r} field (has: {', '.join(sorted(record))})")
    return value


def _text(record: dict[str, Any], key: str, where: str = "") -> str:
    value = _field(record, key, where)
    if not isinstance(value, str):
        raise _RowError(BAD_FIELD, f"{where}{key!r} is {_describe(value)}; expected text")
    return value


def _list(record: dict[str, Any], key: str) -> list:
    value = _field(record, key)
    if not isinstance(value, list):
        raise _RowError(BAD_FIELD, f"{key!r} is {_describe(value)}; expected a list")
    if len(value) < 2:
        raise _RowError(TOO_FEW_RESPONSES, f"{key!r} has {len(value)} response(s); a listwise record needs >= 2")
    return value


def _messages(value: Any, where: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise _RowError(BAD_MESSAGES, f"{where} is {_describe(value)}; expected a non-empty list of {{role, content}}")
    messages: list[Message] = []
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)):
            detail = f"{where}[{i}] is {_describe(message)}; a message needs a role in {ROLES} and text content"
            raise _RowError(BAD_MESSAGES, detail)
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _prompt_messages(record: dict[str, Any]) -> list[Message]:
    """`prompt` as text (one user turn) or as a message list."""
    prompt = _field(record, "prompt")
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, "prompt")


def _squash(text: str) -> str:
    return " ".join(text.split())


def _shared_prompt_length(chosen: list[Message], rejected: list[Message]) -> int:
    """The largest k such that chosen[:k] == rejected[:k] (ignoring whitespace) ends with a user turn and
    both continue with an assistant turn."""
    same = 0
    while (
        same < min(len(chosen), len(rejected))
        and chosen[same]["role"] == rejected[same]["role"]
        and _squash(chosen[same]["content"]) == _squash(rejected[same]["content"])
    ):
        same += 1
    for k in range(min(same, len(chosen) - 1, len(rejected) - 1), 0, -1):
        if chosen[k - 1]["role"] == "user" and chosen[k]["role"] == rejected[k]["role"] == "assistant":
            return k
    raise _RowError(
        BAD_MESSAGES,
        f"chosen and rejected share no prompt ending with a user turn and followed by an assistant reply in both "
        f"(they agree on their first {same} turn(s))",
    )


def _split_messages(chosen: list[Message], rejected: list[Message]) -> _Parts:
    """Shared prompt + the single assistant reply that follows it in chosen and in rejected."""
    k = _shared_prompt_length(chosen, rejected)
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if len(messages) != k + 1:
            raise _RowError(
                BAD_MESSAGES,
                f"{name} has {len(messages) - k} messages after the shared prompt; expected one assistant reply",
            )
    return _Parts(chosen[:k], [chosen[k]["content"], rejected[k]["content"]])


def _hh_turns(text: str, key: str) -> tuple[list[Message], list[int]]:
    """The transcript's turns as messages, and the offset in `text` where each turn's content starts."""
    marks = list(_HH_TURN.finditer(text))
    if not marks or text[: marks[0].start()].strip():
        raise _RowError(
            BAD_MESSAGES, f"{key!r} is not a '\\n\\nHuman: ...\\n\\nAssistant: ...' transcript (starts {text[:40]!r})"
        )
    ends = [mark.start() for mark in marks[1:]] + [len(text)]
    messages: list[Message] = [
        {"role": _HH_ROLES[mark.group(1)], "content": text[mark.end(): end].strip()}
        for mark, end in zip(marks, ends, strict=True)
    ]
    return messages, [mark.end() for mark in marks]


def _score_value(value: Any) -> float | None:
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


def _fill(raw: list[Any], fill: ScoreFill, where: str) -> list[float]:
    """Scores as floats, with the invalid ones filled per `fill` (per prompt) or rejected as bad_score."""
    values = [_score_value(v) for v in raw]
    bad = [i for i, v in enumerate(values) if v is None]
    if not bad:
        return values
    if fill is None:
        raise _RowError(
            BAD_SCORE,
            f"{where}, response {bad[0]}: {raw[bad[0]]!r} is not a finite number (set data.score_fill to "
            "min, mean or a number to fill missing scores)",
        )
    valid = [v for v in values if v is not None]
    if fill in SCORE_FILLS and not valid:
        raise _RowError(BAD_SCORE, f"{where}: no valid score to take the {fill} of ({raw_excerpt(raw, 80)})")
    try:
        replacement = {"min": min, "mean": statistics.fmean}[fill](valid) if fill in SCORE_FILLS else float(fill)
    except OverflowError:  # the mean of huge scores overflows
        raise _RowError(BAD_SCORE, f"{where}: the {fill} of the valid scores overflows a float") from None
    return [replacement if v is None else v for v in values]


def _score_table(table: Any, n: int, spec: _ScoreSpec, where: str) -> tuple[list[str], list[list[float]]]:
    """(objective names, [K][N] scores) from {objective: [N scores]}."""
    if not isinstance(table, dict) or not table:
        raise _RowError(BAD_FIELD, f"{where} is {_describe(table)}; expected {{objective: [{n} numbers]}}")
    names = list(spec.objectives) if spec.objectives else sorted(table)
    scores = []
    for name in names:
        column = table.get(name)
        if column is None:
            raise _RowError(MISSING_FIELD, f"{where} has no objective {name!r} (has: {', '.join(sorted(table))})")
        if not isinstance(column, list):
            raise _RowError(BAD_SCORE, f"{where}[{name!r}] is {_describe(column)}; expected a list of {n} numbers")
        if len(column) != n:
            raise _RowError(LENGTH_MISMATCH, f"{where}[{name!r}] has {len(column)} scores for {n} responses")
        scores.append(_fill(column, spec.fill, f"{where}[{name!r}]"))
    return names, scores


def _pairwise_text(record: dict[str, Any], spec: _ScoreSpec) -> _Parts:
    return _Parts(_prompt_messages(record), [_text(record, "chosen"), _text(record, "rejected")])


def _pairwise_messages(record: dict[str, Any], spec: _ScoreSpec) -> _Parts:
    prompt = _prompt_messages(record)
    _check_prompt(prompt)  # before the split, whose error would otherwise blame chosen / rejected
    chosen = _messages(_field(record, "chosen"), "chosen")
    rejected = _messages(_field(record, "rejected"), "rejected")
    return _split_messages(prompt + chosen, prompt + rejected)


def _pairwise_implicit(record: dict[str, Any], spec: _ScoreSpec) -> _Parts:
    return _split_messages(
        _messages(_field(record, "chosen"), "chosen"), _messages(_field(record, "rejected"), "rejected")
    )


def _hh(record: dict[str, Any], spec: _ScoreSpec) -> _Parts:
    chosen_text, rejected_text = _text(record, "chosen"), _text(record, "rejected")
    chosen, chosen_at = _hh_turns(chosen_text, "chosen")
    rejected, rejected_at = _hh_turns(rejected_text, "rejected")
    k = _shared_prompt_length(chosen, rejected)
    return _Parts(chosen[:k], [chosen_text[chosen_at[k]:].strip(), rejected_text[rejected_at[k]:].strip()])


def _ultrafeedback_binarized(record: dict[str, Any], spec: _ScoreSpec) -> _Parts:
    """The user turn inside chosen/rejected is the prompt; scores, when given, become objective "score"."""
    parts = _pairwise_implicit(record, spec)
    pair = [record.get("score_chosen"), record.get("score_rejected")]
    if pair == [None, None]:
        return parts
    objectives, scores = _score_table({"score": pair}, 2, _ScoreSpec(None, spec.fill), "score_chosen/score_rejected")
    return parts._replace(objectives=objectives, scores=scores)


def _listwise(record: dict[str, Any], spec: _ScoreSpec) -> _Parts:
    prompt = _prompt_messages(record)
    responses = _list(record, "responses")
    for i, response in enumerate(responses):
        if not isinstance(response, str):
            raise _RowError(BAD_FIELD, f"responses[{i}] is {_describe(response)}; expected text")
    objectives, scores = _score_table(_field(record, "scores"), len(responses), spec, "scores")
    return _Parts(prompt, responses, objectives, scores)


def _ultrafeedback(record: dict[str, Any], spec: _ScoreSpec) -> _Parts:
    prompt: list[Message] = [{"role": "user", "content": _text(record, "instruction")}]
    completions = _list(record, "completions")
    responses, ratings = [], {}
    for i, completion in enumerate(completions):
        if not isinstance(completion, dict):
            raise _RowError(BAD_FIELD, f"completions[{i}] is {_describe(completion)}; expected an object")
        responses.append(_text(completion, "response", f"completions[{i}]."))
        annotations = completion.get("annotations") or {}
        if not isinstance(annotations, dict):
            detail = f"completions[{i}].annotations is {_describe(annotations)}; expected {{aspect: {{Rating}}}}"
            raise _RowError(BAD_FIELD, detail)
        for aspect, note in annotations.items():
            rating = note.get("Rating") if isinstance(note, dict) else None
            ratings.setdefault(aspect, [None] * len(completions))[i] = rating
    if not ratings:
        raise _RowError(MISSING_FIELD, "no completion has annotations[aspect].Rating")
    objectives, scores = _score_table(ratings, len(responses), spec, "annotations Rating")
    return _Parts(prompt, responses, objectives, scores)


_NORMALISERS: dict[str, Callable[[dict[str, Any], _ScoreSpec], _Parts]] = {
    "pairwise_text": _pairwise_text,
    "pairwise_messages": _pairwise_messages,
    "pairwise_implicit": _pairwise_implicit,
    "hh": _hh,
    "ultrafeedback_binarized": _ultrafeedback_binarized,
    "listwise": _listwise,
    "ultrafeedback": _ultrafeedback,
}


# ---------------------------------------------------------------------------------------------- validation


def _check_prompt(prompt: list[Message]) -> None:
    role = prompt[-1]["role"]
    if role != "user":
        raise _RowError(BAD_MESSAGES, f"the prompt's last message has role {role!r}; it must end with a user turn")
    if not prompt[-1]["content"].strip():
        raise _RowError(EMPTY_PROMPT, "the prompt's last user message is empty")


def _check_responses(responses: list[str], kind: str) -> None:
    names = ["chosen", "rejected"] if kind == "pairwise" else [f"responses[{i}]" for i in range(len(responses))]
    seen: dict[str, int] = {}
    for i, response in enumerate(responses):
        if not response.strip():
            raise _RowError(EMPTY_RESPONSE, f"{names[i]} is empty or whitespace-only")
        first = seen.setdefault(_squash(response), i)
        if first != i:
            raise _RowError(IDENTICAL_RESPONSES, f"{names[i]} is identical to {names[first]}: nothing to prefer")


def _record_id(raw: RawRow) -> str:
    for key in ("id", "prompt_id"):
        value = raw.record.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
            raise _RowError(BAD_FIELD, f"{key!r} is {_describe(value)}; expected a non-empty text or integer id")
        return str(value)
    return f"{raw.name or os.path.basename(raw.source)}:{raw.row}"


def _check_unicode(record: NormalisedRecord) -> None:
    """Every text must encode as UTF-8, which Arrow and the tokenizer need: JSON can carry lone surrogates."""
    texts = [("id", record["id"]), ("source", record["source"])]
    texts += [(f"prompt[{i}].content", m["content"]) for i, m in enumerate(record["prompt"])]
    texts += [(f"responses[{i}]", r) for i, r in enumerate(record["responses"])]
    texts += [(f"objective name {i}", name) for i, name in enumerate(record["objectives"])]
    for where, text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise _RowError(
                INVALID_UNICODE, f"{where} holds {text[err.start]!r} at character {err.start}: a lone surrogate "
                "is not valid Unicode (in JSON, an unpaired \\udXXX escape)",
            ) from None


def normalise(
    raw: RawRow, fmt: str, *, objectives: list[str] | None = None, score_fill: ScoreFill = None
) -> NormalisedRecord | Reject:
    """One raw row -> a normalised record, or a Reject naming the reason (never raises for bad data).

    `fmt` is one of FORMATS, or "auto" to detect it from this row alone. `objectives` picks and orders the
    listwise objectives (others in the row are ignored); `score_fill` handles invalid scores (module docstring).
    """
    _check_format(fmt)
    return _normalise(raw, fmt, _ScoreSpec(objectives, _check_score_fill(score_fill)))


def _normalise(raw: RawRow, fmt: str, spec: _ScoreSpec) -> NormalisedRecord | Reject:
    if raw.record is None:
        reason = DAMAGED_FILE if raw.damaged else UNDECODABLE
        return Reject(raw.source, raw.row, reason, raw.error or "no record", raw.raw_text)
    try:
        row_fmt = detect_format(raw.record) if fmt == "auto" else fmt
        parts = _NORMALISERS[row_fmt](raw.record, spec)
        kind = KINDS[row_fmt]
        _check_prompt(parts.prompt)
        _check_responses(parts.responses, kind)
        record: NormalisedRecord = {
            "id": _record_id(raw), "kind": kind, "prompt": parts.prompt, "responses": parts.responses,
            "objectives": list(parts.objectives), "scores": list(parts.scores), "source": raw.source,
            "row": raw.row,
        }
        _check_unicode(record)
    except FormatError as err:
        return Reject(raw.source, raw.row, MISSING_FIELD, str(err), raw_excerpt(raw.record))
    except _RowError as err:
        return Reject(raw.source, raw.row, err.reason, err.detail, raw_excerpt(raw.record))
    except Exception as err:  # a safety net: no row, whatever it holds, may stop the run
        detail = f"{type(err).__name__}: {err} (reading the row as {fmt})"
        return Reject(raw.source, raw.row, NORMALISER_ERROR, detail, raw_excerpt(raw.record))
    return record


def _own_format(raw: RawRow) -> str | None:
    """The format this row's own columns match, None when it has none (or no record)."""
    try:
        return None if raw.record is None else detect_format(raw.record)
    except FormatError:
        return None


def _file_format(own: list[str | None], outs: list[Any]) -> tuple[str | None, int]:
    """(the format of one file, how many of its rows have it): the one most rows are valid records of, else
    the one most rows match; ties go to the format seen first; None when no row matches any format."""
    valid = Counter(fmt for fmt, out in zip(own, outs, strict=True) if fmt and not isinstance(out, Reject))
    votes = valid or Counter(fmt for fmt in own if fmt)
    if not votes:
        return None, 0
    [(fmt, count)] = votes.most_common(1)  # most_common keeps first-seen order among equal counts
    return fmt, count


def _check_kind(source: str, fmt: str, formats: dict[str, str]) -> None:
    """Every source of one dataset must be of the same kind (pairwise or listwise)."""
    for other, other_fmt in formats.items():
        if KINDS[other_fmt] != KINDS[fmt]:
            raise FormatError(
                f"{source} is {fmt} ({KINDS[fmt]}) but {other} is {other_fmt} "
                f"({KINDS[other_fmt]}): one dataset must be all pairwise or all listwise"
            )
    formats[source] = fmt


def _damaged(rows: list[RawRow], outs: list[NormalisedRecord | Reject]) -> list[NormalisedRecord | Reject]:
    """A file that cannot be read to its end is rejected as a whole: its rows read before the damage too."""
    first = next((raw for raw in rows if raw.damaged), None)
    if first is None:
        return outs
    unit = "row" if first.source.lower().endswith(".parquet") else "line"
    detail = (f"the file cannot be read to its end (from {unit} {first.row}: {first.error}), so the whole file is "
              "rejected")
    return [out if raw.damaged else Reject(raw.source, raw.row, DAMAGED_FILE, detail,
                                           raw_excerpt(raw.record) if raw.record is not None else raw.raw_text)
            for raw, out in zip(rows, outs, strict=True)]


def normalise_source(rows: list[RawRow], fmt: str, *, objectives: list[str] | None = None,
                     score_fill: ScoreFill = None) -> tuple[str | None, list[NormalisedRecord | Reject]]:
    """(the source's format, one normalised record or Reject per row) of one source (a file, or a dataset's
    split): the checks that need no other source. The format is `fmt`, or under "auto" the one most rows
    are valid records of (else the one most rows match; None when no row matches any)."""
    _check_format(fmt)
    spec = _ScoreSpec(objectives, _check_score_fill(score_fill))
    if fmt != "auto":
        return fmt, _damaged(rows, [_normalise(raw, fmt, spec) for raw in rows])
    own = [_own_format(raw) for raw in rows]
    outs = [_normalise(raw, row_fmt or "auto", spec) for raw, row_fmt in zip(rows, own, strict=True)]
    file_fmt, votes = _file_format(own, outs)
    if file_fmt is None:  # no row of a known shape: each row's reject lists the formats
        return None, _damaged(rows, outs)
    for i, (raw, row_fmt) in enumerate(zip(rows, own, strict=True)):
        if raw.record is None or row_fmt == file_fmt:
            continue
        out = _normalise(raw, file_fmt, spec)  # a row of another shape is read as the file's format
        if isinstance(out, Reject):
            looks = f"this row looks like {row_fmt}" if row_fmt else "this row matches no format"
            out = replace(out, detail=f"{out.detail} (read as {file_fmt}, the format of {votes} of {len(rows)} "
                                      f"rows of this file; {looks})")
        outs[i] = out
    return file_fmt, _damaged(rows, outs)


def check_kinds(formats: dict[str, str]) -> None:
    """Every source of one dataset must be of the same kind (pairwise or listwise): {source: format}."""
    seen: dict[str, str] = {}
    for source, fmt in formats.items():
        _check_kind(source, fmt, seen)


def common_objectives(counts: Counter, first_at: dict[tuple[str, ...], str]) -> Callable[[NormalisedRecord], Reject | None]:
    """Listwise records must all score the same objectives: the set most of them score (`counts`: records
    per objective tuple, in the order first seen) is kept. Returns the verdict on one record: None when it
    scores that set (or is pairwise), else a missing_field reject when it lacks one of its names, an
    objective_mismatch reject when it has others. Never a silent drop of an objective. `first_at`: the
    "source:row" of each tuple's first record."""
    if len(counts) < 2:
        return lambda out: None
    [(common, n_common)] = counts.most_common(1)  # most_common keeps first-seen order among equal counts
    others = (f"{n_common} of {sum(counts.values())} listwise rows score {', '.join(common)} (the first at "
              f"{first_at[common]})")

    def verdict(out: NormalisedRecord) -> Reject | None:
        names = tuple(out["objectives"])
        if out["kind"] != "listwise" or names == common:
            return None
        has = ", ".join(names)
        if missing := [name for name in common if name not in names]:
            reason, detail = MISSING_FIELD, f"scores has no objective {missing[0]!r} (has: {has}); {others}"
        else:
            extra = ", ".join(name for name in names if name not in common)
            reason, detail = OBJECTIVE_MISMATCH, (f"scores has objective(s) {extra} that the other rows do not "
                                                  f"(has: {has}); {others}; set data.objectives to pick the "
                                                  "objectives to train on")
        return Reject(out["source"], out["row"], reason, detail, raw_excerpt(out))

    return verdict


def duplicate_reject(out: NormalisedRecord, first_at: str) -> Reject:
    """The duplicate_id reject of a record whose id the record at `first_at` ("source:row") already uses."""
    return Reject(out["source"], out["row"], DUPLICATE_ID, f"id {out['id']!r} is already used by {first_at}",
                  raw_excerpt(out))


def _reject_other_objectives(outcomes: list[Any]) -> None:
    """`common_objectives` over the listwise records of `outcomes`, in place."""
    listwise = [out for out in outcomes if not isinstance(out, Reject) and out["kind"] == "listwise"]
    counts = Counter(tuple(out["objectives"]) for out in listwise)
    first_at: dict[tuple[str, ...], str] = {}
    for out in listwise:
        first_at.setdefault(tuple(out["objectives"]), f"{out['source']}:{out['row']}")
    verdict = common_objectives(counts, first_at)
    for i, out in enumerate(outcomes):
        if not isinstance(out, Reject):
            outcomes[i] = verdict(out) or out


def _reject_duplicate_ids(outcomes: list[Any]) -> None:
    """A repeated id is a duplicate_id reject; the first occurrence is kept."""
    first_seen: dict[str, str] = {}  # id -> "source:row" of its first record
    for i, out in enumerate(outcomes):
        if isinstance(out, Reject):
            continue
        if out["id"] in first_seen:
            outcomes[i] = duplicate_reject(out, first_seen[out["id"]])
        else:
            first_seen[out["id"]] = f"{out['source']}:{out['row']}"


def read_normalised(
    path: str,
    *,
    fmt: str = "auto",
    split: str | None = None,
    objectives: list[str] | None = None,
    score_fill: ScoreFill = None,
) -> tuple[list[NormalisedRecord], list[Reject]]:
    """Read and normalise a whole source: (records, rejects); every row read is in exactly one of the two.

    Under fmt="auto" each file is read as the format most of its rows are valid records of (else the one most
    rows match; the first seen among equals), so an odd first row does not decide; a reject of a row of
    another shape says so. A file that
    cannot be read to its end is rejected as a whole (`damaged_file`). Without `objectives`, listwise rows
    must score the same objectives (see `_reject_other_objectives`). A repeated id is a `duplicate_id`
    reject (the first occurrence is kept); the raw excerpt of these two kinds of reject is the normalised
    record. Records and rejects each keep the reading order.
    """
    _check_format(fmt)
    _check_score_fill(score_fill)
    outcomes: list[NormalisedRecord | Reject] = []
    formats: dict[str, str] = {}  # source -> its format
    for _, rows in itertools.groupby(iter_raw_rows(path, split=split), key=lambda raw: raw.source):
        rows = list(rows)
        source_fmt, source_outcomes = normalise_source(rows, fmt, objectives=objectives, score_fill=score_fill)
        if source_fmt is not None:
            formats[rows[0].source] = source_fmt
        outcomes += source_outcomes
    check_kinds(formats)
    if objectives is None:
        _reject_other_objectives(outcomes)
    _reject_duplicate_ids(outcomes)
    records = [out for out in outcomes if not isinstance(out, Reject)]
    return records, [out for out in outcomes if isinstance(out, Reject)]
