"""The row-level stages of the prepare graph: read + normalise one source unit (a Ray task each), the
duplicate-id group-by (Ray tasks), reading staged rows back in slices, and the checks that need the whole
split (objective sets, duplicate ids: decided from streamed aggregates) followed by tokenization (in the
scoring actors, `scoring_pool.ScoringActor`).

Every stage keeps one output row per input row: a rejected row stays in the stream as a row with
`reject_reason` set (and its source, row, detail and raw excerpt), so rows in = rows kept + rejects holds at
every stage, and the rejects file is written from the stream in reading order. `order` (unit << 32 | row)
is a row's place in the reading order: the first occurrence of an id is the one with the smallest order.
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mallows_ray.data.normalise import common_objectives, duplicate_reject, normalise_source
from mallows_ray.data.rejects import Reject
from mallows_ray.data.schema import NORMALISED_SCHEMA, NormalisedRecord
from mallows_ray.data.sources import SourceUnit, iter_unit_rows
from mallows_ray.data.tokenize import LengthLimits, tokenize_batch

ROW_BITS = 32  # order = unit index << ROW_BITS | row number within the unit
REJECT_FIELDS = [pa.field("reject_reason", pa.string()), pa.field("reject_detail", pa.string()),
                 pa.field("reject_raw", pa.string())]
# read + normalise output: the normalised record (empty fields on a reject), where it is, and the verdict
STAGED_SCHEMA = pa.schema(list(NORMALISED_SCHEMA) + [
    pa.field("order", pa.int64()),
    pa.field("format", pa.string()),          # the unit's format (None when no row of it matches one)
    pa.field("objectives_key", pa.string()),  # json of the objective names: a group-by key
] + REJECT_FIELDS)
TOKENIZED_SCHEMA = pa.schema(list(NORMALISED_SCHEMA) + [
    pa.field("prompt_ids", pa.list_(pa.int32())),
    pa.field("response_ids", pa.list_(pa.list_(pa.int32()))),
    pa.field("prompt_tokens", pa.int32()),  # len(prompt_ids): with ref_token_counts, a row's padded length
    pa.field("prompt_truncated", pa.bool_()),
    pa.field("response_truncated", pa.list_(pa.bool_())),
    pa.field("order", pa.int64()),
] + REJECT_FIELDS)
STAGE_BLOCK_ROWS = 1024  # rows per block a unit's task stages: bounded memory per block, steady progress
STAGING_GROUP_ROWS = 256  # staging row groups: a block of the scoring stage decodes the few that hold it
UNIT_SUMMARY_SCHEMA = pa.schema([pa.field("unit", pa.int64()), pa.field("source", pa.string()),
                                 pa.field("format", pa.string()), pa.field("rows", pa.int64()),
                                 pa.field("kept", pa.int64()), pa.field("objectives", pa.string())])


def order_of(unit: int, row: int) -> int:
    return unit << ROW_BITS | row


def _staged_row(out: NormalisedRecord | Reject, order: int, fmt: str | None) -> dict[str, Any]:
    if isinstance(out, Reject):
        return {"id": "", "kind": "", "prompt": [], "responses": [], "objectives": [], "scores": [],
                "source": out.source, "row": out.row, "order": order, "format": fmt, "objectives_key": "",
                "reject_reason": out.reason, "reject_detail": out.detail, "reject_raw": out.raw}
    return {**out, "order": order, "format": fmt, "objectives_key": json.dumps(out["objectives"]),
            "reject_reason": "", "reject_detail": "", "reject_raw": ""}


def stage_unit(unit: dict[str, Any], *, fmt: str, objectives: list[str] | None,
               score_fill: Any) -> Iterator[pa.Table]:
    """The staged rows of one source unit (`unit`: index, path, name, dataset, split), in reading order,
    `STAGE_BLOCK_ROWS` at a time. The unit's rows are held by the caller alone (the format vote and the
    damaged-file rule need all of them)."""
    rows = list(iter_unit_rows(SourceUnit(unit["path"], unit["name"], unit["dataset"], unit["split"])))
    unit_fmt, outcomes = normalise_source(rows, fmt, objectives=objectives, score_fill=score_fill)
    for start in range(0, len(rows), STAGE_BLOCK_ROWS):
        chunk = zip(rows[start:start + STAGE_BLOCK_ROWS], outcomes[start:start + STAGE_BLOCK_ROWS])
        yield pa.Table.from_pylist([_staged_row(out, order_of(unit["unit"], raw.row), unit_fmt)
                                    for raw, out in chunk], schema=STAGED_SCHEMA)


def normalise_units(units: pa.Table, *, fmt: str, objectives: list[str] | None, score_fill: Any,
                    out_dir: str) -> Iterator[pa.Table]:
    """Ray Data UDF, a task per source unit: its staged rows (`stage_unit`) written by this task to
    `out_dir/unit-NNNNN.parquet` (row groups of `STAGING_GROUP_ROWS`), and one summary row per block of them
    for the driver, which never holds the rows: unit, source, format, rows, kept, and `objectives`, the json
    [[objectives_key, count, first "source:row"], ...] of the block's kept listwise rows in first-seen order."""
    for unit in units.to_pylist():
        writer = None
        for block in stage_unit(unit, fmt=fmt, objectives=objectives, score_fill=score_fill):
            if writer is None:
                writer = pq.ParquetWriter(f"{out_dir}/unit-{unit['unit']:05d}.parquet", STAGED_SCHEMA)
            writer.write_table(block, row_group_size=STAGING_GROUP_ROWS)
            good = block.filter(pc.equal(block.column("reject_reason"), ""))
            listwise = good.filter(pc.equal(good.column("kind"), "listwise"))
            counts: dict[str, list] = {}
            for key, source, row in zip(*(listwise.column(c).to_pylist() for c in ("objectives_key", "source", "row"))):
                counts.setdefault(key, [key, 0, f"{source}:{row}"])[1] += 1
            yield pa.Table.from_pylist([{
                "unit": unit["unit"], "source": block.column("source")[0].as_py(),
                "format": block.column("format")[0].as_py(), "rows": block.num_rows, "kept": good.num_rows,
                "objectives": json.dumps(list(counts.values()))}], schema=UNIT_SUMMARY_SCHEMA)
        if writer is not None:
            writer.close()


class SplitVerdicts:
    """What the split-wide checks decided, small enough to ship to every task: the objective tuples with
    their counts in first-seen order and first "source:row" (when objectives are not configured), and the
    ids used more than once with the order and "source:row" of their first use."""

    def __init__(self, objective_counts: list[tuple[list[str], int, str]] | None,
                 duplicates: dict[str, tuple[int, str]]):
        self.objective_counts = objective_counts
        self.duplicates = duplicates

    def objective_verdict(self):
        if self.objective_counts is None:
            return lambda out: None
        counts = Counter({tuple(names): n for names, n, _ in self.objective_counts})  # insertion = first seen
        return common_objectives(counts, {tuple(names): where for names, _, where in self.objective_counts})

    def reject(self, out: NormalisedRecord, order: int, objective_verdict) -> Reject | None:
        """The reject a split-wide check makes of a normalised record, None when it passes them."""
        rejected = objective_verdict(out)
        if rejected is None and out["id"] in self.duplicates:
            first_order, first_at = self.duplicates[out["id"]]
            if order != first_order:
                rejected = duplicate_reject(out, first_at)
        return rejected


def read_slice(file: str, start: int, rows: int) -> pa.Table:
    """Rows [start, start + rows) of a staging parquet file, decoding only the row groups that hold them."""
    reader = pq.ParquetFile(file)
    sizes = [reader.metadata.row_group(g).num_rows for g in range(reader.metadata.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    first = int(np.searchsorted(starts, start, side="right")) - 1
    last = int(np.searchsorted(starts, start + rows, side="left"))  # exclusive
    return reader.read_row_groups(list(range(first, last))).slice(start - int(starts[first]), rows)


def repeated_ids(files: list[str], partition: int, partitions: int, common_key: str | None) -> pa.Table:
    """Ray task, one per partition of a hash group-by on id: the ids of this partition (crc32(id) % partitions)
    that more than one surviving staged row uses, with the smallest `order` of each (its first use): columns
    id, first. Reads the narrow columns of `files` a row group at a time and holds only its partition's ids.
    Rows already rejected, and listwise rows not scoring `common_key` (the objective check rejects them), use
    no id."""
    columns = ["id", "order", "reject_reason", "kind", "objectives_key"]
    kept = []
    for file in files:
        reader = pq.ParquetFile(file)
        for group in range(reader.num_row_groups):
            table = reader.read_row_group(group, columns=columns)
            keep = pc.equal(table.column("reject_reason"), "")
            if common_key is not None:
                keep = pc.and_(keep, pc.or_(pc.not_equal(table.column("kind"), "listwise"),
                                            pc.equal(table.column("objectives_key"), common_key)))
            table = table.filter(keep).select(["id", "order"])
            if partitions > 1:
                mine = [zlib.crc32(i.encode()) % partitions == partition for i in table.column("id").to_pylist()]
                table = table.filter(pa.array(mine, pa.bool_()))
            kept.append(table)
    ids = pa.concat_tables(kept) if kept else pa.table({"id": pa.array([], pa.string()),
                                                         "order": pa.array([], pa.int64())})
    uses = ids.group_by("id").aggregate([("order", "count"), ("order", "min")])
    repeated = uses.filter(pc.greater(uses.column("order_count"), 1))
    return pa.table({"id": repeated.column("id"), "first": repeated.column("order_min")})


def split_verdicts(objective_counts, unit_sources: dict[int, str], *repeated: pa.Table) -> "SplitVerdicts":
    """Ray task: the SplitVerdicts of a split from the objective counts and every partition's `repeated_ids`
    (`unit_sources`: unit index -> its source, to name where an id was first used)."""
    mask = (1 << ROW_BITS) - 1
    duplicates = {i: (first, f"{unit_sources[first >> ROW_BITS]}:{first & mask}")
                  for table in repeated for i, first in zip(table.column("id").to_pylist(),
                                                             table.column("first").to_pylist())}
    return SplitVerdicts(objective_counts, duplicates)


def finalise_and_tokenize(table: pa.Table, *, verdicts: SplitVerdicts, tokenizer_path: str,
                          limits: LengthLimits) -> list[dict[str, Any]]:
    """Staged rows -> the split-wide verdicts applied, the surviving rows tokenized (a prompt too long, or
    responses identical once truncated, become rejects too): one row (a dict of `TOKENIZED_SCHEMA`'s fields)
    per input row, in order. Python rows, so that scoring reads the token ids without a round trip through
    Arrow."""
    rows = table.to_pylist()
    verdict = verdicts.objective_verdict()
    kept = []
    for row in rows:
        if row["reject_reason"]:
            continue
        record = {name: row[name] for name in NORMALISED_SCHEMA.names}
        rejected = verdicts.reject(record, row["order"], verdict)
        if rejected is not None:
            row.update(reject_reason=rejected.reason, reject_detail=rejected.detail, reject_raw=rejected.raw)
        else:
            kept.append(row)
    for row, tokenized in zip(kept, tokenize_batch(kept, tokenizer_path=tokenizer_path, limits=limits)):
        row.update(tokenized, prompt_tokens=len(tokenized["prompt_ids"]), reject_raw="")
    for row in rows:  # rejects carry empty token columns
        if row["reject_reason"]:
            row.update(prompt_ids=[], response_ids=[], prompt_tokens=0, prompt_truncated=False,
                       response_truncated=[])
    return rows
