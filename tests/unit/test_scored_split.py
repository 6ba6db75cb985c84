"""Random access to a scored split written by `shards.ShardWriter` (parquet parts + memory-mapped Arrow IPC
twins): rows by index across parts and record batches, s(x) from Hbar(x) and c, the read counter, padded
lengths from the narrow columns, and clear errors."""

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mallows_ray.data.scored_split import TRAINING_COLUMNS, ScoredSplit
from mallows_ray.data.shards import RANDOM_ACCESS_DIR, ShardWriter
from mallows_ray.train.batches import padded_length

C = 0.8  # the dispersion scale c the split is read with


def _row(i):
    responses = [[7] * (1 + i % 4), [8] * (2 + i % 3)] + ([[9] * 5] if i % 5 == 0 else [])
    return {"id": f"r{i:03d}", "prompt": [{"role": "user", "content": f"q{i}"}], "prompt_ids": [1] * (2 + i % 6),
            "response_ids": responses, "ref_logps": [-1.0] * len(responses),
            "ref_shared_logps": [-0.5] * len(responses), "ref_token_counts": [len(r) for r in responses],
            "hbar": 0.1 + i / 100, "scores": [], "prompt_tokens": 2 + i % 6, "responses": ["x"] * len(responses)}


def _split(folder, rows=30, file_bytes=1, row_group_rows=4, drop=()):
    """`rows` rows through ShardWriter: a new part after every row group (file_bytes=1), row groups of
    `row_group_rows`; returns the rows in order."""
    data = [{k: v for k, v in _row(i).items() if k not in drop} for i in range(rows)]
    table = pa.Table.from_pylist(data)
    writer = ShardWriter(folder, table.schema, file_bytes=file_bytes, row_group_rows=row_group_rows,
                         random_access=True)
    for start in range(0, rows, 7):  # blocks that do not line up with the row groups
        writer.write(table.slice(start, 7))
    writer.close()
    return data


def test_take_returns_rows_by_index_across_parts_and_batches(tmp_path):
    rows = _split(tmp_path / "train")
    assert len(list((tmp_path / "train").glob("*.parquet"))) == 8  # 30 rows in groups of 4, one group a part
    assert len(list((tmp_path / "train" / RANDOM_ACCESS_DIR).glob("*.arrow"))) == 8
    split = ScoredSplit(tmp_path / "train", C)
    assert len(split) == 30
    indices = [29, 0, 11, 10, 9, 17, 3, 3]
    taken = split.take(indices)
    assert [r["id"] for r in taken] == [rows[i]["id"] for i in indices]
    expected = {c: rows[11][c] for c in TRAINING_COLUMNS}
    assert taken[2] == {**expected, "dispersion": pytest.approx(-C * math.log(rows[11]["hbar"]), rel=1e-12)}
    assert split.rows_read == 8
    assert [r["id"] for batch in split.iter_rows(8) for r in batch] == [r["id"] for r in rows]
    assert split.dispersion() == pytest.approx([-C * math.log(r["hbar"]) for r in rows], rel=1e-12)
    with pytest.raises(IndexError, match="out of range 0..29"):
        split.take([30])


def test_the_parquet_parts_hold_the_same_rows(tmp_path):
    """The split folder still reads as plain parquet (the twins' folder starts with "_")."""
    rows = _split(tmp_path / "train")
    assert pq.read_table(tmp_path / "train").to_pylist() == rows


@pytest.mark.parametrize("share_prompt", [False, True])
def test_padded_lengths_from_the_narrow_columns(tmp_path, share_prompt):
    rows = _split(tmp_path / "train")
    lengths = ScoredSplit(tmp_path / "train", C).padded_lengths(share_prompt)
    assert lengths.tolist() == [padded_length(r, share_prompt) for r in rows]


def test_errors_name_the_folder_or_file(tmp_path):
    _split(tmp_path / "old", drop=("prompt_tokens",))
    with pytest.raises(ValueError, match=r"old/_arrow/part-00000.arrow has no column prompt_tokens.*prepare"):
        ScoredSplit(tmp_path / "old", C)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no _arrow/.*not a scored split folder"):
        ScoredSplit(tmp_path / "empty", C)
    (tmp_path / "parquet_only").mkdir()
    pq.write_table(pa.Table.from_pylist([_row(0)]), tmp_path / "parquet_only" / "part-00000.parquet")
    with pytest.raises(FileNotFoundError, match="parquet only: prepared by an older mallows_ray"):
        ScoredSplit(tmp_path / "parquet_only", C)
