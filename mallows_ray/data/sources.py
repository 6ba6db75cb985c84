"""Readers: the rows of a preference data source as decoded, before any normalising (`normalise.py`).

Sources (`source_units`, `list_source_files`)
    * a .jsonl, .jsonl.gz or .parquet file (any case of the suffix), or a folder of them (searched
      recursively, read in sorted path order; its other files are named in a SkippedFilesWarning);
    * a Hugging Face `datasets` folder written by `save_to_disk` (a Dataset: dataset_info.json + state.json;
      a DatasetDict: dataset_dict.json, pick one with `split`);
    * otherwise a Hugging Face hub dataset name, loaded with `datasets.load_dataset` when the hub is
      reachable.
    A source is cut into units (`SourceUnit`: a data file, or a whole dataset), the unit of parallel reading:
    `iter_unit_rows` reads one, `iter_raw_rows` all of a source's in order.

Row numbers: the 1-based line number for jsonl / jsonl.gz (blank lines are skipped but counted), the 0-based
row index for parquet files and Hugging Face datasets. Undecodable lines come out as rows with `error` set
(invalid JSON or UTF-8, nesting too deep to parse, a parquet row Arrow cannot convert), and a file that stops
being readable (a corrupt or truncated gzip stream, a broken parquet footer or page) ends with `damaged` rows:
one per unread row where the parquet footer gives the count, else one for the unknown rest. A reader never
raises in the middle of a file; `normalise.normalise_source` rejects a damaged file as a whole (every row
read from it too), so a truncated file cannot pass as a few bad rows.
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from mallows_ray.data.rejects import raw_excerpt

SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
_PARQUET_BATCH_ROWS = 1024
_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


class RawRow(NamedTuple):
    """One row as read: a decoded JSON object / table row, or the reason it could not be decoded."""

    source: str  # file path, save_to_disk folder[/split] or hub dataset name/split
    row: int  # 1-based line number (jsonl), 0-based row index (parquet, HF datasets)
    record: dict[str, Any] | None
    error: str | None = None  # set (and record None) when the row is undecodable
    raw_text: str = ""  # the undecodable line, truncated, for the rejects file
    name: str = ""  # the source in default ids: its path relative to the folder read, else its basename
    damaged: bool = False  # an error row saying the file cannot be read from here on (a damaged_file reject)


class SkippedFilesWarning(UserWarning):
    """A folder source holds files that are not data files and are not read."""


class DataSourceError(ValueError):
    """A path or dataset name that cannot be read as a source."""


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
