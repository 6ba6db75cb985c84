"""Sharded parquet output: an ordered stream of Arrow tables -> part-00000.parquet, part-00001.parquet, ...

Files are cut when the Arrow bytes written to one reach `FILE_BYTES`, always on a row-group boundary, and
row groups hold `ROW_GROUP_ROWS` rows. Both depend only on the rows and their order, so the same stream gives
the same files, whatever produced it (how many scoring actors, the order in which they finished).

With `random_access`, each part also gets an uncompressed Arrow IPC twin (`_arrow/part-00000.arrow`, the same
rows in record batches of the same size) that training memory-maps: reading row i then touches only row i's
bytes, where parquet would decode its whole row group (`scored_split.py`). It costs the split's Arrow size on
disk. The folder's name starts with "_", which parquet readers skip (pyarrow's and Ray's dataset discovery),
so the split folder still reads as plain parquet.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

FILE_BYTES = 256 * 2**20  # Arrow (in-memory) bytes per file; on disk, compressed, they are fewer
ROW_GROUP_ROWS = 512
RANDOM_ACCESS_DIR = "_arrow"  # the Arrow IPC twins, inside the split folder


def part_name(index: int, suffix: str = ".parquet") -> str:
    return f"part-{index:05d}{suffix}"


class ShardWriter:
    """Writes the tables given to `write`, in order, as size-bounded parquet files of `schema` in `folder`."""

    def __init__(self, folder: str | Path, schema: pa.Schema, *, file_bytes: int = FILE_BYTES,
                 row_group_rows: int = ROW_GROUP_ROWS, random_access: bool = False):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.schema, self.file_bytes, self.row_group_rows = schema, file_bytes, row_group_rows
        self.random_access = random_access
        self.files: list[Path] = []  # the parquet parts
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._twin: pa.ipc.RecordBatchFileWriter | None = None  # the current part's Arrow IPC twin
        self._file_bytes = 0
        self._pending: list[pa.Table] = []  # rows not yet written: less than one row group
        self._pending_rows = 0

    def write(self, table: pa.Table) -> None:
        """Append `table`'s rows (cast to the schema: blocks may infer, e.g., null for an all-empty list)."""
        if table.num_rows == 0:
            return
        self._pending.append(table.select(self.schema.names).cast(self.schema))
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        while self._pending_rows >= self.row_group_rows:
            self._flush(self.row_group_rows)

    def close(self) -> list[Path]:
        """Write the last rows and close; the files written, in order (one empty file when no row came)."""
        if self._pending_rows:
            self._flush(self._pending_rows)
        if not self.files:
            self._open()
        self._close_part()
        return self.files

    def _close_part(self) -> None:
        for writer in (self._writer, self._twin):
            if writer is not None:
                writer.close()
        self._writer = self._twin = None

    def _open(self) -> None:
        self._close_part()
        index = len(self.files)
        self.files.append(self.folder / part_name(index))
        self._writer = pq.ParquetWriter(self.files[-1], self.schema)
        if self.random_access:
            twins = self.folder / RANDOM_ACCESS_DIR
            twins.mkdir(exist_ok=True)
            self._twin = pa.ipc.new_file(twins / part_name(index, ".arrow"), self.schema)
        self._file_bytes = 0

    def _flush(self, rows: int) -> None:
        """Write the first `rows` pending rows as one row group, in a new file when the current one is full."""
        pending = pa.concat_tables(self._pending)
        group, rest = pending.slice(0, rows), pending.slice(rows)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        if self._writer is None or self._file_bytes >= self.file_bytes:
            self._open()
        self._writer.write_table(group, row_group_size=rows)
        if self._twin is not None:
            self._twin.write_batch(group.combine_chunks().to_batches()[0])  # one record batch per row group
        self._file_bytes += group.nbytes
