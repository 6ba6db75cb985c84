"""Issue 15, data half: one test per finding (readers, silent alterations, the cache and its manifest).

The readers' crash-freedom is fuzzed in test_formats_fuzz.py; here each finding found by hand is pinned
down with its exact outcome. The pipeline's own checks (gate on reuse, rebuild of a damaged cache, the
rejects file when every row is bad) run on Ray in tests/integration/test_prepare_hardening.py.
"""

from __future__ import annotations

import gzip
import json
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mallows_ray.config import load_config
from mallows_ray.data import manifest as mf
from mallows_ray.data.cache import open_cache
from mallows_ray.data.normalise import normalise_source, read_normalised
from mallows_ray.data.pipeline import prepare
from mallows_ray.data.rejects import DataValidationError, Reject, RejectsFile, read_rejects
from mallows_ray.data.schema import NORMALISED_SCHEMA
from mallows_ray.data.sources import RawRow, SkippedFilesWarning
from mallows_ray.data.tokenize import LengthLimits, tokenize_record
from mallows_ray.models import load_tokenizer


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def _pair(i, **extra):
    return {"prompt": f"question {i}", "chosen": f"yes {i}", "rejected": f"no {i}", **extra}


def _listwise(i, **scores):
    return {"id": f"l{i}", "prompt": f"colour {i}?", "responses": ["red", "blue"], "scores": scores}


# ---------------------------------------------------------------------------------------------- readers


@pytest.mark.parametrize("row, reason, words", [
    ({"prompt": "p", "responses": ["a", "b"], "scores": {"x": [10**400, 1]}}, "bad_score", "not a finite number"),
    ({"instruction": "p", "completions": [{"response": "a", "annotations": [1]}, {"response": "b"}]},
     "bad_field", "completions[0].annotations is list"),
    ({"prompt": "\ud800 hi", "chosen": "a", "rejected": "b"}, "invalid_unicode", "prompt[0].content holds '\\ud800'"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "id": "\udcff"}, "invalid_unicode", "id holds"),
])
def test_rows_that_used_to_raise_are_rejects(row, reason, words):
    """Found by hand: an int beyond the float range (OverflowError), annotations that are not a mapping
    (AttributeError), lone surrogates (Arrow's UnicodeEncodeError later, in the pipeline)."""
    _, [out] = normalise_source([RawRow("f.jsonl", 3, row)], "auto")
    assert isinstance(out, Reject) and (out.source, out.row, out.reason) == ("f.jsonl", 3, reason), out
    assert words in out.detail
    out.raw.encode("utf-8")  # the raw excerpt is valid UTF-8 (surrogates escaped)


def test_mean_fill_of_huge_scores_is_a_bad_score_not_an_overflow():
    row = {"prompt": "p", "responses": ["a", "b", "c"], "scores": {"x": [1e308, 1e308, None]}}
    _, [out] = normalise_source([RawRow("f.jsonl", 1, row)], "listwise", score_fill="mean")
    assert isinstance(out, Reject) and out.reason == "bad_score" and "overflows" in out.detail


def test_deep_nesting_and_bom_lines(tmp_path):
    deep = '{"prompt": ' + "[" * 50_000 + "]" * 50_000 + ', "chosen": "a", "rejected": "b"}'
    path = tmp_path / "deep.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(_pair(0)).encode() + b"\n" + deep.encode() + b"\n")
    records, rejects = read_normalised(str(path))
    assert [r["row"] for r in records] == [1]  # a UTF-8 byte order mark does not cost the first row
    assert [(r.row, r.reason) for r in rejects] == [(2, "undecodable")] and "nested too deeply" in rejects[0].detail
    with RejectsFile(tmp_path / "rejects.jsonl") as out:
        for reject in rejects:
            out.add(reject)
    assert len(read_rejects(out.path)) == 1


def test_parquet_row_with_invalid_utf8_is_one_reject(tmp_path):
    """Arrow raised UnicodeDecodeError for the whole file; now only the bad row is rejected."""
    good = pa.array([b"question 0", b"\xff\xfe", b"question 2"], pa.binary())
    prompts = pa.Array.from_buffers(pa.string(), 3, good.buffers())  # a string column holding invalid UTF-8
    table = pa.table({"prompt": prompts, "chosen": ["a", "a", "a"], "rejected": ["b", "b", "b"]})
    pq.write_table(table, tmp_path / "bad.parquet")
    records, rejects = read_normalised(str(tmp_path / "bad.parquet"))
    assert [r["row"] for r in records] == [0, 2]
    assert [(r.row, r.reason) for r in rejects] == [(1, "undecodable")] and "UnicodeDecodeError" in rejects[0].detail


def test_truncated_parquet_counts_every_unread_row_when_the_footer_says(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([_pair(i) for i in range(5)]), path)
    path.write_bytes(path.read_bytes()[:-20])  # the footer is cut: the row count is unknown
    records, rejects = read_normalised(str(path))
    assert records == [] and [(r.row, r.reason) for r in rejects] == [(0, "damaged_file")]
    assert "cannot be read from here on" in rejects[0].detail and "ArrowInvalid" in rejects[0].detail


def test_odd_first_row_does_not_decide_the_format(tmp_path):
    """The first row (a stray listwise-looking row) used to fix the file's format: every other row was lost."""
    odd = {"prompt": "p", "responses": ["a"], "scores": {}}
    path = _write_jsonl(tmp_path / "pairs.jsonl", [odd, "{broken", *[_pair(i) for i in range(4)]])
    records, rejects = read_normalised(str(path))
    assert [r["row"] for r in records] == [3, 4, 5, 6]
    assert [(r.row, r.reason) for r in rejects] == [(1, "missing_field"), (2, "undecodable")]
    assert "read as pairwise_text, the format of 4 of 6 rows of this file; this row looks like listwise" \
        in rejects[0].detail


def test_every_row_bad_still_gives_rejects_not_an_exception(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}, "[1]", {"x": 1}])
    records, rejects = read_normalised(str(path))
    assert records == [] and [(r.row, r.reason) for r in rejects] == [
        (1, "missing_field"), (2, "undecodable"), (3, "missing_field")]
    assert "cannot tell the format" in rejects[0].detail


# ---------------------------------------------------------------------------------------------- silent alterations


def test_same_file_name_in_two_folders_keeps_both(tmp_path):
    """Rows without ids got `<file name>:<line>`: a second a/train.jsonl lost every row as duplicate_id."""
    _write_jsonl(tmp_path / "a" / "train.jsonl", [_pair(0), _pair(1)])
    _write_jsonl(tmp_path / "b" / "train.jsonl", [_pair(2), _pair(3)])
    records, rejects = read_normalised(str(tmp_path))
    assert not rejects and [r["id"] for r in records] == ["a/train.jsonl:1", "a/train.jsonl:2", "b/train.jsonl:1",
                                                          "b/train.jsonl:2"]
    # the cache fingerprint follows the paths, so moving a file between folders (new ids) rebuilds
    before = mf.data_fingerprint([str(tmp_path / "a" / "train.jsonl")], str(tmp_path))
    (tmp_path / "c").mkdir()
    (tmp_path / "a" / "train.jsonl").rename(tmp_path / "c" / "train.jsonl")
    assert mf.data_fingerprint([str(tmp_path / "c" / "train.jsonl")], str(tmp_path)) != before


def test_other_extensions_are_named_and_suffix_case_is_ignored(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", [_pair(0)])
    _write_jsonl(tmp_path / "b.JSONL", [_pair(1)])
    _write_jsonl(tmp_path / "c.json", [_pair(2)])
    (tmp_path / "d.jsonl.GZ").write_bytes(gzip.compress(json.dumps(_pair(3)).encode()))
    with pytest.warns(SkippedFilesWarning, match=r"skipping 1 file\(s\) that are not .*: c\.json"):
        records, rejects = read_normalised(str(tmp_path))
    assert not rejects and [r["prompt"][0]["content"] for r in records] == [f"question {i}" for i in (0, 1, 3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a folder of data files only: no warning
        read_normalised(str(tmp_path / "b.JSONL"))


def test_extra_objective_in_later_rows_is_a_reject_not_a_silent_drop(tmp_path):
    rows = [_listwise(0, x=[1, 2]), _listwise(1, x=[2, 1]), _listwise(2, x=[1, 2], y=[2, 1])]
    records, [reject] = read_normalised(str(_write_jsonl(tmp_path / "extra.jsonl", rows)))
    assert [r["id"] for r in records] == ["l0", "l1"] and all(r["objectives"] == ["x"] for r in records)
    assert (reject.row, reject.reason) == (3, "objective_mismatch")
    assert "objective(s) y that the other rows do not (has: x, y); 2 of 3 listwise rows score x" in reject.detail
    assert "data.objectives" in reject.detail


def test_first_row_with_more_objectives_no_longer_costs_the_others(tmp_path):
    """The other order: the first row fixed {x, y} and every later row was a missing_field reject."""
    rows = [_listwise(0, x=[1, 2], y=[2, 1]), _listwise(1, x=[2, 1]), _listwise(2, x=[1, 2])]
    records, [reject] = read_normalised(str(_write_jsonl(tmp_path / "first.jsonl", rows)))
    assert [r["id"] for r in records] == ["l1", "l2"]
    assert (reject.row, reject.reason) == (1, "objective_mismatch")
    records, rejects = read_normalised(str(tmp_path / "first.jsonl"), objectives=["x"])  # an explicit choice
    assert len(records) == 3 and not rejects


def test_replies_identical_after_truncation_are_rejected(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    record = {"id": "r", "kind": "pairwise", "source": "f.jsonl", "row": 4, "objectives": [], "scores": [],
              "prompt": [{"role": "user", "content": "Say hi"}],
              "responses": ["hello there, friend", "hello there, enemy"]}
    out = tokenize_record(tokenizer, record, LengthLimits(max_prompt_length=64, max_response_length=6))
    assert out["reject_reason"] == "identical_after_truncation"
    assert "responses 0 and 1 are the same 6 tokens once truncated" in out["reject_detail"]
    assert tokenize_record(tokenizer, record, LengthLimits(64, 64))["reject_reason"] == ""


# ---------------------------------------------------------------------------------------------- the cache


def _cache_entry(folder, n_rejects=1, rows_in=4):
    """A scored cache entry as prepare leaves it: a split parquet, the rejects file, then the manifest."""
    (folder / "train").mkdir(parents=True)
    table = pa.table({"id": ["a", "b", "c"], "prompt_ids": [[1], [2], [3]], "ref_logps": [[0.1], [0.2], [0.3]]})
    pq.write_table(table, folder / "train" / "part-00000.parquet")
    with RejectsFile(folder / "rejects.jsonl") as out:
        for _ in range(n_rejects):
            out.add(Reject("t.jsonl", 4, "undecodable", "not valid JSON"))
    manifest = {"splits": {"train": {"rows_in": rows_in, "rows_out": 3, "rejected": n_rejects}}, "kind": "pairwise",
                "rejects": {"count": n_rejects, "by_reason": {"undecodable": n_rejects}}, "dispersion_scale": 1.0,
                "tokenizer": "t"}
    mf.write_manifest(folder, manifest)
    return folder


def test_gate_is_rechecked_on_every_use_of_a_cache(tmp_path):
    """max_bad_fraction is not in the cache key: a looser earlier run used to let a stricter one through."""
    folder = _cache_entry(tmp_path / "entry")
    assert open_cache(folder, 0.25).manifest["files"]["train/part-00000.parquet"]["bytes"] > 0
    with pytest.raises(DataValidationError, match=r"1 of 4 rows rejected \(25.00%\), more than max_bad_fraction=0.1"):
        open_cache(folder, 0.1)
    assert open_cache(tmp_path / "nothing", 0.0) is None


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "train" / "part-00000.parquet").write_bytes((f / "train" / "part-00000.parquet").read_bytes()[:-9]),
     r"train/part-00000.parquet: \d+ bytes, but .*manifest.json records \d+ \(truncated or changed\)"),
    (lambda f: (f / "manifest.json").write_text((f / "manifest.json").read_text()[:-30]),
     r"manifest.json: damaged manifest \(JSONDecodeError"),
    (lambda f: (f / "manifest.json").write_text("{}"),
     r"manifest.json: damaged or outdated manifest, no files, splits"),
    (lambda f: (f / "rejects.jsonl").unlink(), r"rejects.jsonl: listed in .*manifest.json but missing"),
    (lambda f: (f / "rejects.jsonl").write_text("x" * (f / "rejects.jsonl").stat().st_size),
     r"rejects.jsonl: its SHA-256 differs"),
    (lambda f: pq.write_table(pa.table({"id": ["z"]}), f / "train" / "part-00001.parquet"),
     r"train/part-00001.parquet: not listed in"),
])
def test_a_damaged_cache_entry_names_the_path(tmp_path, damage, message):
    folder = _cache_entry(tmp_path / "entry")
    damage(folder)
    with pytest.raises(mf.CacheError, match=message) as err:
        open_cache(folder, 1.0)
    assert str(folder) in str(err.value)


def _config(model_dir, train, cache_dir):
    return load_config(None, [f"model.name_or_path={model_dir}", f"data.train={train}", f"data.cache_dir={cache_dir}"])


def test_a_scored_folder_is_not_read_as_raw_data(tmp_path, tiny_model_dir):
    """data.train at a cache entry whose manifest is gone was read as raw data (its parquet rows rejected)."""
    folder = _cache_entry(tmp_path / "entry")
    (folder / "manifest.json").unlink()
    with pytest.raises(mf.CacheError) as err:
        prepare(_config(tiny_model_dir, folder, tmp_path / "cache"))  # fails before Ray starts
    message = str(err.value)
    assert f"data.train={folder} is a scored cache folder, not raw data" in message
    assert "rejects.jsonl beside split folders (train)" in message and "has the scored columns prompt_ids, ref_logps" \
        in message and "no manifest.json" in message
    with pytest.raises(mf.CacheError, match="has the scored columns"):  # one split folder of an entry
        prepare(_config(tiny_model_dir, folder / "train", tmp_path / "cache"))
    mf.write_manifest(folder, {})
    with pytest.raises(mf.CacheError, match=r"it has manifest.json.*train on it as it is"):
        prepare(_config(tiny_model_dir, folder, tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()  # nothing was prepared
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(pa.Table.from_pylist([{**_pair(0), "prompt_ids": [1, 2]}]), raw / "pre_tokenized.parquet")
    assert mf.scored_folder_signs(raw) == []  # raw data with a prompt_ids column of its own is raw data


def test_records_fit_the_arrow_schema_whatever_the_source(tmp_path):
    """What Arrow cannot take (here: a lone surrogate) never reaches the pipeline's table."""
    rows = [_pair(0), {"prompt": "q", "chosen": "\ud83d", "rejected": "b"}, _pair(2)]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json.dumps escapes the surrogate as \ud83d
    records, [reject] = read_normalised(str(path))
    assert pa.Table.from_pylist(records, schema=NORMALISED_SCHEMA).num_rows == 2
    assert (reject.row, reject.reason) == (2, "invalid_unicode") and "responses[0] holds" in reject.detail
