"""The row-level stages of prepare without Ray: read + normalise per source unit (the same verdicts as
`read_normalised`, rejects naming file and line), the split-wide verdicts before tokenization, and the
sharded writer's deterministic, size-bounded output."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mallows_ray.data.normalise import read_normalised
from mallows_ray.data.shards import ShardWriter
from mallows_ray.data.sources import source_units
from mallows_ray.data.stages import (
    ROW_BITS,
    SplitVerdicts,
    finalise_and_tokenize,
    normalise_units,
    read_slice,
    repeated_ids,
    split_verdicts,
)
from mallows_ray.data.tokenize import LengthLimits


def _pair(i, **extra):
    return {"prompt": f"Question {i}?", "chosen": f"yes {i}", "rejected": f"no {i}", **extra}


def _units(src):
    return pa.Table.from_pylist([{"unit": i, **u._asdict()} for i, u in enumerate(source_units(str(src)))])


def _stage1(src, out_dir):
    """What stage 1's tasks stage for `src`, read back from the files they write; and their summaries."""
    out_dir.mkdir()
    summaries = pa.concat_tables(normalise_units(_units(src), fmt="auto", objectives=None, score_fill=None,
                                                 out_dir=str(out_dir))).to_pylist()
    return pa.concat_tables(pq.read_table(f) for f in sorted(out_dir.glob("unit-*.parquet"))), summaries


def test_normalise_units_agrees_with_read_normalised_and_keeps_file_and_line(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text("".join(json.dumps(_pair(i)) + "\n" for i in range(3)) + "{bad\n")
    (tmp_path / "data" / "b.jsonl").write_text(json.dumps(_pair(5, chosen="same", rejected="same")) + "\n\n"
                                               + json.dumps(_pair(6)) + "\n")
    staged, summaries = _stage1(tmp_path / "data", tmp_path / "staged")
    assert [(s["unit"], s["rows"], s["kept"]) for s in summaries] == [(0, 4, 3), (1, 2, 1)]  # a block a unit here
    records, rejects = read_normalised(str(tmp_path / "data"))  # no duplicates or objectives here
    good = staged.filter(pa.compute.equal(staged.column("reject_reason"), "")).to_pylist()
    assert [r["id"] for r in good] == [r["id"] for r in records] == ["a.jsonl:1", "a.jsonl:2", "a.jsonl:3",
                                                                     "b.jsonl:3"]
    bad = staged.filter(pa.compute.not_equal(staged.column("reject_reason"), "")).to_pylist()
    assert [(r["source"], r["row"], r["reject_reason"]) for r in bad] == \
        [(r.source, r.row, r.reason) for r in rejects] == \
        [(str(tmp_path / "data" / "a.jsonl"), 4, "undecodable"),
         (str(tmp_path / "data" / "b.jsonl"), 1, "identical_responses")]
    # reading order: unit index, then line (the blank line 2 of b.jsonl is no row)
    assert staged.column("order").to_pylist() == [1, 2, 3, 4, 1 << ROW_BITS | 1, 1 << ROW_BITS | 3]
    assert set(staged.column("format").to_pylist()) == {"pairwise_text"}


def test_split_verdicts_reject_later_uses_of_an_id_and_other_objective_sets(tmp_path, tiny_model_dir):
    rows = [{"id": "x", "prompt": "p", "responses": ["a", "b"], "scores": {"help": [1, 2]}},
            {"id": "y", "prompt": "p", "responses": ["a", "b"], "scores": {"help": [2, 1]}},
            {"id": "x", "prompt": "q", "responses": ["c", "d"], "scores": {"help": [1, 2]}},
            {"id": "z", "prompt": "q", "responses": ["c", "d"], "scores": {"warmth": [1, 2]}}]
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    staged, summaries = _stage1(tmp_path / "l.jsonl", tmp_path / "staged")
    where = f"{tmp_path / 'l.jsonl'}"
    # the objective sets of the kept listwise rows, counted with their first use, for the driver to merge
    assert json.loads(summaries[0]["objectives"]) == [['["help"]', 3, f"{where}:1"], ['["warmth"]', 1, f"{where}:4"]]
    verdicts = SplitVerdicts([(["help"], 3, f"{where}:1"), (["warmth"], 1, f"{where}:4")],
                             {"x": (1, f"{where}:1")})  # what prepare's aggregates decide for this split
    out = finalise_and_tokenize(staged, verdicts=verdicts, tokenizer_path=str(tiny_model_dir),
                                limits=LengthLimits(32, 16))
    assert [r["reject_reason"] for r in out] == ["", "", "duplicate_id", "missing_field"]
    assert out[2]["reject_detail"] == f"id 'x' is already used by {where}:1"
    assert "scores has no objective 'help'" in out[3]["reject_detail"]
    _, expected = read_normalised(str(tmp_path / "l.jsonl"))  # the in-memory reader decides the same
    assert [(r.row, r.reason, r.detail) for r in expected] == \
        [(o["row"], o["reject_reason"], o["reject_detail"]) for o in out if o["reject_reason"]]
    assert out[0]["prompt_tokens"] == len(out[0]["prompt_ids"]) > 0 and out[2]["prompt_ids"] == []


@pytest.mark.parametrize("partitions", [1, 3])
def test_repeated_ids_is_a_hash_group_by_over_the_surviving_rows(tmp_path, partitions):
    """The duplicate-id check of prepare: every id used by more than one surviving row, with its first use,
    whatever the number of partitions; rejected rows and listwise rows of another objective set use no id."""
    kinds = ["pairwise"] * 6 + ["listwise"] * 2
    table = pa.table({"id": ["a", "b", "a", "c", "b", "a", "d", "d"], "order": [5, 1, 2, 3, 9, 7, 10, 11],
                      "reject_reason": ["", "", "", "", "", "undecodable", "", ""], "kind": kinds,
                      "objectives_key": [""] * 6 + ['["help"]', '["warmth"]']})
    for i, piece in enumerate([table.slice(0, 3), table.slice(3)]):  # two staging files, row groups of 2
        pq.write_table(piece, tmp_path / f"part-{i:05d}.parquet", row_group_size=2)
    files = [str(p) for p in sorted(tmp_path.glob("*.parquet"))]
    found = [repeated_ids(files, p, partitions, common_key='["help"]') for p in range(partitions)]
    assert sorted((i, first) for t in found for i, first in zip(t.column("id").to_pylist(),
                                                                 t.column("first").to_pylist())) == [("a", 2), ("b", 1)]
    assert sum(t.num_rows for t in found) == 2  # each repeated id in exactly one partition
    verdicts = split_verdicts(None, {0: "f.jsonl"}, *found)
    assert verdicts.duplicates == {"a": (2, "f.jsonl:2"), "b": (1, "f.jsonl:1")}
    without_key = repeated_ids(files, 0, 1, common_key=None)  # every listwise row counts: d too
    assert sorted(without_key.column("id").to_pylist()) == ["a", "b", "d"]


def test_read_slice_returns_exactly_the_rows_asked_for(tmp_path):
    table = pa.table({"id": [f"r{i:02d}" for i in range(23)]})
    pq.write_table(table, tmp_path / "s.parquet", row_group_size=5)
    got = [read_slice(str(tmp_path / "s.parquet"), start, rows).column("id").to_pylist()
           for start, rows in [(0, 5), (3, 9), (22, 1), (10, 13)]]
    assert got == [table.column("id").to_pylist()[s:s + n] for s, n in [(0, 5), (3, 9), (22, 1), (10, 13)]]


@pytest.mark.parametrize("chunks", [[100], [1, 99], [37, 37, 26]])
def test_shards_depend_only_on_the_rows_and_their_order(tmp_path, chunks):
    table = pa.table({"id": [f"r{i:03d}" for i in range(100)], "tokens": [[i] * (i % 9) for i in range(100)]})
    writer = ShardWriter(tmp_path / "out", table.schema, file_bytes=1500, row_group_rows=16)
    start = 0
    for n in chunks:
        writer.write(table.slice(start, n))
        start += n
    files = writer.close()
    assert [f.name for f in files] == [f"part-{i:05d}.parquet" for i in range(len(files))] and len(files) > 1
    assert pa.concat_tables(pq.read_table(f) for f in files).equals(table)
    groups = [pq.read_metadata(f).row_group(g).num_rows
              for f in files for g in range(pq.read_metadata(f).num_row_groups)]
    assert groups == [16] * 6 + [4]
    reference = tmp_path / "reference"
    if not reference.exists():
        single = ShardWriter(reference, table.schema, file_bytes=1500, row_group_rows=16)
        single.write(table)
        single.close()
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in sorted(reference.glob("*.parquet"))]


def test_the_progress_display_counts_rows_with_rate_and_eta():
    import io

    from mallows_ray.data.progress import PrepareProgress

    out = io.StringIO()
    progress = PrepareProgress(stream=out, interval=0.0)
    progress.stage("scoring train", total=10)
    progress.add(scored=4)
    progress.end_stage()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert all(line.startswith("[prepare] scoring train: read 0 | rejected 0 | scored 4 | ") for line in lines)
    assert "| 4/10 | ETA " in lines[-1] and "rows/s" in lines[-1]
    progress.stage("reading and validating train")  # no total: no ETA
    progress.add(read=3, rejected=1)
    assert "read 3 | rejected 1" in out.getvalue().splitlines()[-1] and "ETA" not in out.getvalue().splitlines()[-1]
