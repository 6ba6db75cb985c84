"""Random access to the rows of one scored split (a folder written by `prepare`).

A training rank asks for rows by their index in the split (0..N-1 in stored order: the parts in name order,
then their rows). The split's parquet parts each have an uncompressed Arrow IPC twin (`shards.py`), which
this class memory-maps: `take` finds each row's part and record batch from the files' footers and copies out
only the requested rows, so a random row costs its own bytes, not a decoded row group, and no copy of the
split is held in memory (the page cache holds what was touched). Nothing is read through the driver or the
object store, so the split folder must be on storage every worker can read (a local disk on one node, a
shared mount on several).

s(x) is not stored: each row's `dispersion` is computed from its Hbar(x) and the split's calibrated
`dispersion_scale` c when it is read (`losses.dispersion_from_entropy`), so calibrating c never rewrites the data.

`rows_read` counts the rows `take` handed out (a rank's share of an epoch: ~N / W), for the metrics and the
scale benchmark.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mallows_ray.data.shards import RANDOM_ACCESS_DIR
from mallows_ray.losses import dispersion_from_entropy

# The columns training reads (the response texts and per-response statistics are not touched); the prompt
# messages are there for listwise lambda conditioning, which re-renders the prompt per example.
TRAINING_COLUMNS = ("id", "prompt", "prompt_ids", "response_ids", "ref_logps", "ref_shared_logps", "hbar", "scores")
# The narrow columns that give a row's padded length without reading its token ids.
LENGTH_COLUMNS = ("prompt_tokens", "ref_token_counts")


class ScoredSplit:
    """The Arrow parts of `folder` as one table of N rows, read by row index, `columns` only, each row with
    its s(x) as `dispersion` (c = `dispersion_scale`). Opening reads the footers alone; a missing file or
    column is an error naming it."""

    def __init__(self, folder: str | Path, dispersion_scale: float, columns: Sequence[str] = TRAINING_COLUMNS):
        self.folder = Path(folder)
        self.files = sorted((self.folder / RANDOM_ACCESS_DIR).glob("*.arrow"))
        if not self.files:
            old = (" (parquet only: prepared by an older mallows_ray; run `mallows-ray prepare` on the raw data "
                   "again)") if any(self.folder.glob("*.parquet")) else " (not a scored split folder)"
            raise FileNotFoundError(f"{self.folder}: no {RANDOM_ACCESS_DIR}/*.arrow parts{old}")
        self.dispersion_scale = float(dispersion_scale)
        # every record batch of every part, in stored order: memory-mapped, nothing decoded or copied
        self._batches: list[pa.RecordBatch] = []
        for path in self.files:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            self._batches += [reader.get_batch(i) for i in range(reader.num_record_batches)]
        sizes = [batch.num_rows for batch in self._batches]
        # [G + 1]: the first row of each batch, then N
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        names = set(self._batches[0].schema.names) if self._batches else set()
        missing = [c for c in [*columns, *LENGTH_COLUMNS] if c not in names]
        if self._batches and missing:
            raise ValueError(f"{self.files[0]} has no column {', '.join(missing)}: not a scored split of this "
                             "version of mallows_ray; run `mallows-ray prepare` on the raw data again")
        self.columns = list(columns)
        self.rows_read = 0

    def __len__(self) -> int:
        return int(self._starts[-1])

    def padded_lengths(self, share_prompt: bool) -> np.ndarray:
        """[N] int64: each row's packed width (`train.batches.padded_length`), from the narrow columns
        prompt_tokens and ref_token_counts (n(y) per response) alone."""
        prompt = self._column("prompt_tokens").to_numpy().astype(np.int64)
        counts = self._column("ref_token_counts")
        if share_prompt:  # the prompt once, then each response opened by the last prompt token
            return prompt - 1 + _list_agg(counts, "sum") + pc.list_value_length(counts).to_numpy()
        return prompt + _list_agg(counts, "max")

    def dispersion(self) -> np.ndarray:
        """[N] float64: s(x) of every row, in stored order."""
        hbar = np.array(self._column("hbar"), dtype=np.float64)  # a writable copy: torch reads it
        return dispersion_from_entropy(hbar, self.dispersion_scale).numpy()

    def take(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """The rows at `indices` (positions in the split), in that order, as dicts of the selected columns
        plus `dispersion`, s(x)."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"{self.folder}: row index out of range 0..{len(self) - 1}")
        batches = np.searchsorted(self._starts, indices, side="right") - 1
        rows: list[dict[str, Any] | None] = [None] * len(indices)
        for b in np.unique(batches):
            where = np.flatnonzero(batches == b)
            local = pa.array(indices[where] - self._starts[b])
            for position, row in zip(where, self._batches[b].select(self.columns).take(local).to_pylist()):
                rows[position] = row
        if "hbar" in self.columns and rows:
            s = dispersion_from_entropy([row["hbar"] for row in rows], self.dispersion_scale).tolist()
            for row, value in zip(rows, s):
                row["dispersion"] = value
        self.rows_read += len(indices)
        return rows

    def iter_rows(self, batch_size: int) -> Iterator[list[dict[str, Any]]]:
        """Every row in stored order, `batch_size` rows at a time (the last batch may be shorter)."""
        for start in range(0, len(self), batch_size):
            yield self.take(range(start, min(start + batch_size, len(self))))

    def _column(self, name: str) -> pa.ChunkedArray:
        return pa.chunked_array([batch.column(name) for batch in self._batches],
                                type=self._batches[0].schema.field(name).type if self._batches else None)


def _list_agg(column: pa.ChunkedArray, how: str) -> np.ndarray:
    """[N] sum or max of each row's list of ints (every row has at least 2 responses)."""
    flat = pc.list_flatten(column).to_numpy().astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(pc.list_value_length(column).to_numpy())])[:-1]
    return (np.add if how == "sum" else np.maximum).reduceat(flat, offsets)
