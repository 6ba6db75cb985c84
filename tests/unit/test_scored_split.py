"""Random access to a scored split on real parquet files: rows by index across files and row groups, the
bounded row-group cache, the read counters, padded lengths from the narrow columns, and clear errors."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mallows_ray.data.scored_split import TRAINING_COLUMNS, ScoredSplit
from mallows_ray.train.batches import padded_length


def _row(i):
    responses = [[7] * (1 + i % 4), [8] * (2 + i % 3)] + ([[9] * 5] if i % 5 == 0 else [])
    return {"id": f"r{i:03d}", "prompt": [{"role": "user", "content": f"q{i}"}], "prompt_ids": [1] * (2 + i % 6),
            "response_ids": responses, "ref_logps": [-1.0] * len(responses),
            "ref_shared_logps": [-0.5] * len(responses), "ref_token_counts": [len(r) for r in responses],
            "dispersion": 1.0 + i / 100, "scores": [], "prompt_tokens": 2 + i % 6, "responses": ["x"] * len(responses)}


def _split(folder, sizes=(10, 7, 13), row_group_size=4):
    """Files part-00000.. of `sizes` rows each, row groups of `row_group_size` rows; returns all rows in order."""
    folder.mkdir()
    rows = [_row(i) for i in range(sum(sizes))]
    start = 0
    for f, size in enumerate(sizes):
        pq.write_table(pa.Table.from_pylist(rows[start:start + size]), folder / f"part-{f:05d}.parquet",
                       row_group_size=row_group_size)
        start += size
    return rows


def test_take_returns_rows_by_index_across_files_and_row_groups(tmp_path):
    rows = _split(tmp_path / "train")
    split = ScoredSplit(tmp_path / "train")
    assert len(split) == 30
    indices = [29, 0, 11, 10, 9, 17, 3, 3]
    taken = split.take(indices)
    assert [r["id"] for r in taken] == [rows[i]["id"] for i in indices]
    assert taken[2] == {c: rows[11][c] for c in TRAINING_COLUMNS}  # the training columns only
    assert split.rows_read == 8
    # the 5 row groups touched, each decoded once: [29], [0-3], [10-13], [8-9] (file 0's last), [17-20]
    assert split.rows_decoded == 1 + 4 + 4 + 2 + 4
    assert [r["id"] for batch in split.iter_rows(8) for r in batch] == [r["id"] for r in rows]
    with pytest.raises(IndexError, match="out of range 0..29"):
        split.take([30])


def test_the_row_group_cache_is_bounded(tmp_path):
    _split(tmp_path / "train", sizes=(40,), row_group_size=4)
    group_bytes = pq.ParquetFile(tmp_path / "train" / "part-00000.parquet").read_row_group(
        0, columns=list(TRAINING_COLUMNS)).nbytes
    split = ScoredSplit(tmp_path / "train", cache_bytes=3 * group_bytes)
    for _ in range(2):
        split.take(range(40))
    assert split.rows_decoded == 80  # 10 groups > the 3 the cache holds: every pass decodes them again
    roomy = ScoredSplit(tmp_path / "train")
    for _ in range(2):
        roomy.take(np.random.default_rng(0).permutation(40))
    assert (roomy.rows_read, roomy.rows_decoded) == (80, 40)  # the second pass comes from the cache


@pytest.mark.parametrize("share_prompt", [False, True])
def test_padded_lengths_from_the_narrow_columns(tmp_path, share_prompt):
    rows = _split(tmp_path / "train")
    lengths = ScoredSplit(tmp_path / "train").padded_lengths(share_prompt)
    assert lengths.tolist() == [padded_length(r, share_prompt) for r in rows]


def test_a_split_without_the_length_columns_names_the_file(tmp_path):
    (tmp_path / "old").mkdir()
    table = pa.Table.from_pylist([{k: v for k, v in _row(0).items() if k != "prompt_tokens"}])
    pq.write_table(table, tmp_path / "old" / "part-00000.parquet")
    with pytest.raises(ValueError, match=r"old/part-00000.parquet has no column prompt_tokens.*prepare"):
        ScoredSplit(tmp_path / "old")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no parquet files"):
        ScoredSplit(tmp_path / "empty")
