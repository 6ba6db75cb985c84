"""Random access to the rows of one scored split (a folder of parquet files written by `prepare`).

A training rank asks for rows by their index in the split (0..N-1 in stored order: the files in sorted name
order, then their rows); `ScoredSplit.take` finds each row's file and row group from the files' footers and
reads only the row groups that hold requested rows, keeping the most recently used ones decoded in a cache
bounded in bytes. Nothing is read through the driver or the object store, so the split folder must be on
storage every worker can read (a local disk on one node, a shared mount on several).

Two counters say what a rank read, for the metrics and the scale benchmark:
  rows_read     rows handed out by `take` (a rank's share of the epoch: ~N / W per epoch)
  rows_decoded  rows of the row groups decoded on cache misses (what crossed the disk / network)
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

# The columns training reads (the response texts and per-response statistics stay on disk); the prompt
# messages are there for listwise lambda conditioning, which re-renders the prompt per example.
TRAINING_COLUMNS = ("id", "prompt", "prompt_ids", "response_ids", "ref_logps", "ref_shared_logps", "dispersion",
                    "scores")
# The narrow columns that give a row's padded length without reading its token ids.
LENGTH_COLUMNS = ("prompt_tokens", "ref_token_counts")
# Decoded row groups a rank keeps (bytes of Arrow memory): a small split stays whole after its first epoch.
CACHE_BYTES = 256 * 2**20


class ScoredSplit:
    """The parquet files of `folder` as one table of N rows, read by row index, `columns` only. Opening reads
    the footers alone; a missing column is a ValueError naming the file."""

    def __init__(self, folder: str | Path, columns: Sequence[str] = TRAINING_COLUMNS, cache_bytes: int = CACHE_BYTES):
        self.folder = Path(folder)
        self.files = sorted(self.folder.glob("*.parquet"))
        if not self.files:
            raise FileNotFoundError(f"{self.folder}: no parquet files (not a scored split folder)")
        # one entry per row group of every file, in stored order: (file index, group index in its file)
        self._groups: list[tuple[int, int]] = []
        sizes = []
        for f, path in enumerate(self.files):
            metadata = pq.read_metadata(path)
            for g in range(metadata.num_row_groups):
                self._groups.append((f, g))
                sizes.append(metadata.row_group(g).num_rows)
        self._starts = np.concatenate([[0], np.cumsum(sizes)])  # [G + 1]: first row of each group, then N
        names = set(pq.read_schema(self.files[0]).names)
        missing = [c for c in [*columns, *LENGTH_COLUMNS] if c not in names]
        if missing:
            raise ValueError(f"{self.files[0]} has no column {', '.join(missing)}: not a scored split of this "
                             "version of mallows_ray; run `mallows-ray prepare` on the raw data again")
        self.columns = list(columns)
        self.cache_bytes = cache_bytes
        self._readers: dict[int, pq.ParquetFile] = {}  # opened on first use: footers are read once
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()
        self._cached_bytes = 0
        self.rows_read = 0
        self.rows_decoded = 0

    def __len__(self) -> int:
        return int(self._starts[-1])

    def padded_lengths(self, share_prompt: bool) -> np.ndarray:
        """[N] int64: each row's packed width (`train.batches.padded_length`), from the narrow columns
        prompt_tokens and ref_token_counts (n(y) per response) alone."""
        table = pa.concat_tables(pq.read_table(p, columns=list(LENGTH_COLUMNS)) for p in self.files)
        prompt = table.column("prompt_tokens").to_numpy().astype(np.int64)
        counts = table.column("ref_token_counts")
        if share_prompt:  # the prompt once, then each response opened by the last prompt token
            return prompt - 1 + _list_agg(counts, "sum") + pc.list_value_length(counts).to_numpy()
        return prompt + _list_agg(counts, "max")

    def take(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """The rows at `indices` (positions in the split), in that order, as dicts of the selected columns."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"{self.folder}: row index out of range 0..{len(self) - 1}")
        groups = np.searchsorted(self._starts, indices, side="right") - 1
        rows: list[dict[str, Any] | None] = [None] * len(indices)
        for group in np.unique(groups):
            where = np.flatnonzero(groups == group)
            local = pa.array(indices[where] - self._starts[group])
            for position, row in zip(where, self._group(int(group)).take(local).to_pylist()):
                rows[position] = row
        self.rows_read += len(indices)
        return rows

    def iter_rows(self, batch_size: int) -> Iterator[list[dict[str, Any]]]:
        """Every row in stored order, `batch_size` rows at a time (the last batch may be shorter)."""
        for start in range(0, len(self), batch_size):
            yield self.take(range(start, min(start + batch_size, len(self))))

    def _group(self, group: int) -> pa.Table:
        """Row group `group` decoded (its selected columns), through the LRU cache."""
        table = self._cache.pop(group, None)
        if table is None:
            f, g = self._groups[group]
            if f not in self._readers:
                self._readers[f] = pq.ParquetFile(self.files[f])
            table = self._readers[f].read_row_group(g, columns=self.columns)
            self.rows_decoded += table.num_rows
            self._cached_bytes += table.nbytes
        self._cache[group] = table  # most recently used last
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, evicted = self._cache.popitem(last=False)
            self._cached_bytes -= evicted.nbytes
        return table


def _list_agg(column: pa.ChunkedArray, how: str) -> np.ndarray:
    """[N] sum or max of each row's list of ints (every row has at least 2 responses)."""
    flat = pc.list_flatten(column).to_numpy().astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(pc.list_value_length(column).to_numpy())])[:-1]
    return (np.add if how == "sum" else np.maximum).reduceat(flat, offsets)
