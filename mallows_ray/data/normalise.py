"""Normalising: raw rows (`sources.py`) -> records of the one schema (`schema.py`) or `Reject`s; bad data
never raises.

    a row      its format's normaliser (`normalisers.py`), then its id and the checks every record passes;
               whatever the row holds, a row that does not normalise becomes a `Reject` with a reason code
               from `rejects.REASONS` (texts with lone surrogates: `invalid_unicode`; so every record fits
               NORMALISED_SCHEMA in Arrow)
    a source   `normalise_source`: the checks that need no other source (under format "auto", the format
               most of its rows are valid records of; a file that cannot be read to its end is rejected as
               a whole)
    a dataset  `read_normalised`, in memory: one kind for every source (`detect.check_kinds`), one objective
               set for listwise rows (`common_objectives`), unique ids (`duplicate_reject`). Prepare's graph
               makes the same checks from streamed aggregates (`stages.py`).
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from mallows_ray.data.detect import KINDS, FormatError, check_format, check_kinds, detect_format
from mallows_ray.data.fields import (
    RowError,
    ScoreFill,
    ScoreSpec,
    check_prompt,
    check_responses,
    check_score_fill,
    describe,
)
from mallows_ray.data.normalisers import NORMALISERS
from mallows_ray.data.rejects import (
    BAD_FIELD,
    DAMAGED_FILE,
    DUPLICATE_ID,
    INVALID_UNICODE,
    MISSING_FIELD,
    NORMALISER_ERROR,
    OBJECTIVE_MISMATCH,
    UNDECODABLE,
    Reject,
    raw_excerpt,
)
from mallows_ray.data.schema import NormalisedRecord
from mallows_ray.data.sources import RawRow, iter_raw_rows


def _record_id(raw: RawRow) -> str:
    """The row's own `id` / `prompt_id`, else "<name>:<row>" (`schema.py`)."""
    for key in ("id", "prompt_id"):
        value = raw.record.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
            raise RowError(BAD_FIELD, f"{key!r} is {describe(value)}; expected a non-empty text or integer id")
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
            raise RowError(
                INVALID_UNICODE, f"{where} holds {text[err.start]!r} at character {err.start}: a lone surrogate "
                "is not valid Unicode (in JSON, an unpaired \\udXXX escape)",
            ) from None


def _normalise_row(raw: RawRow, fmt: str, spec: ScoreSpec) -> NormalisedRecord | Reject:
    """One raw row -> a normalised record, or a Reject naming the reason (never raises for bad data); `fmt` is
    one of FORMATS, or "auto" to detect it from this row alone."""
    if raw.record is None:
        reason = DAMAGED_FILE if raw.damaged else UNDECODABLE
        return Reject(raw.source, raw.row, reason, raw.error or "no record", raw.raw_text)
    try:
        row_fmt = detect_format(raw.record) if fmt == "auto" else fmt
        parts = NORMALISERS[row_fmt](raw.record, spec)
        kind = KINDS[row_fmt]
        check_prompt(parts.prompt)
        check_responses(parts.responses, kind)
        record: NormalisedRecord = {
            "id": _record_id(raw), "kind": kind, "prompt": parts.prompt, "responses": parts.responses,
            "objectives": list(parts.objectives), "scores": list(parts.scores), "source": raw.source,
            "row": raw.row,
        }
        _check_unicode(record)
    except FormatError as err:
        return Reject(raw.source, raw.row, MISSING_FIELD, str(err), raw_excerpt(raw.record))
    except RowError as err:
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
    check_format(fmt)
    spec = ScoreSpec(objectives, check_score_fill(score_fill))
    if fmt != "auto":
        return fmt, _damaged(rows, [_normalise_row(raw, fmt, spec) for raw in rows])
    own = [_own_format(raw) for raw in rows]
    outs = [_normalise_row(raw, row_fmt or "auto", spec) for raw, row_fmt in zip(rows, own, strict=True)]
    file_fmt, votes = _file_format(own, outs)
    if file_fmt is None:  # no row of a known shape: each row's reject lists the formats
        return None, _damaged(rows, outs)
    for i, (raw, row_fmt) in enumerate(zip(rows, own, strict=True)):
        if raw.record is None or row_fmt == file_fmt:
            continue
        out = _normalise_row(raw, file_fmt, spec)  # a row of another shape is read as the file's format
        if isinstance(out, Reject):
            looks = f"this row looks like {row_fmt}" if row_fmt else "this row matches no format"
            out = replace(out, detail=f"{out.detail} (read as {file_fmt}, the format of {votes} of {len(rows)} "
                                      f"rows of this file; {looks})")
        outs[i] = out
    return file_fmt, _damaged(rows, outs)


def common_objectives(counts: Counter,
                      first_at: dict[tuple[str, ...], str]) -> Callable[[NormalisedRecord], Reject | None]:
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
    another shape says so. A file that cannot be read to its end is rejected as a whole (`damaged_file`).
    Without `objectives`, listwise rows must score the same objectives (see `_reject_other_objectives`). A
    repeated id is a `duplicate_id` reject (the first occurrence is kept); the raw excerpt of these two kinds
    of reject is the normalised record. Records and rejects each keep the reading order.
    """
    check_format(fmt)
    check_score_fill(score_fill)
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
