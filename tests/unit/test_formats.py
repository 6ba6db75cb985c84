"""Readers and normalisers (mallows_ray.data: sources, detect, normalisers, normalise) and the rejects file /
bad-fraction gate (rejects.py).

Every format is written as a real small file (jsonl, jsonl.gz, parquet, a datasets save_to_disk folder) and
read back through the public API; one file holds every kind of bad row; the real Anthropic HH file is read
when ../shared is present.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mallows_ray.data.detect import FORMATS, FormatError, detect_format
from mallows_ray.data.normalise import normalise_source, read_normalised
from mallows_ray.data.rejects import (
    REASONS,
    DataValidationError,
    Reject,
    RejectsFile,
    check_bad_fraction,
    summarise_rejects,
)
from mallows_ray.data.schema import NORMALISED_SCHEMA
from mallows_ray.data.sources import DataSourceError, RawRow, SkippedFilesWarning, iter_raw_rows, list_source_files

REPO = Path(__file__).resolve().parents[2]
HH_DIR = Path(__file__).parents[2] / ".." / "shared" / "data" / "hh-rlhf"


# ---------------------------------------------------------------------------------------------- test data


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _write_jsonl(path, rows, extra_lines=()):
    """Rows as JSON lines, then `extra_lines` verbatim (bytes or str); gzip-compressed for *.gz."""
    lines = [json.dumps(row).encode() for row in rows]
    lines += [line if isinstance(line, bytes) else line.encode() for line in extra_lines]
    data = b"".join(line + b"\n" for line in lines)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def _write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _save_to_disk(path, rows_or_splits):
    """A datasets save_to_disk folder: a Dataset from a list, a DatasetDict from {split: rows}."""
    datasets = pytest.importorskip("datasets")
    if isinstance(rows_or_splits, dict):
        data = datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in rows_or_splits.items()})
    else:
        data = datasets.Dataset.from_list(rows_or_splits)
    data.save_to_disk(str(path))
    return path


def _read(path, **kwargs):
    """read_normalised expecting no rejects; the records must fit NORMALISED_SCHEMA."""
    records, rejects = read_normalised(str(path), **kwargs)
    assert not rejects, [r.describe() for r in rejects]
    assert pa.Table.from_pylist(records, schema=NORMALISED_SCHEMA).to_pylist() == records
    return records


# ---------------------------------------------------------------------------------------------- formats


def test_pairwise_text_jsonl(tmp_path):
    rows = [{"id": "a", "prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},
            {"prompt": "2+2?", "chosen": "4", "rejected": "5"}]
    path = _write_jsonl(tmp_path / "train.jsonl", rows)
    assert _read(path) == [
        {"id": "a", "kind": "pairwise", "prompt": [_user("Hi?")], "responses": ["Hello!", "Go away."],
         "objectives": [], "scores": [], "source": str(path), "row": 1},
        {"id": "train.jsonl:2", "kind": "pairwise", "prompt": [_user("2+2?")], "responses": ["4", "5"],
         "objectives": [], "scores": [], "source": str(path), "row": 2},
    ]


def test_pairwise_messages_parquet(tmp_path):
    prompt = [{"role": "system", "content": "Be brief."}, _user("Hi"), _assistant("Hello."), _user("Name a fruit")]
    rows = [{"prompt": prompt, "chosen": [_assistant("Apple.")], "rejected": [_assistant("No.")]}]
    path = _write_parquet(tmp_path / "conv.parquet", rows)
    [record] = _read(path)
    assert record["prompt"] == prompt and record["responses"] == ["Apple.", "No."]
    assert (record["id"], record["row"]) == ("conv.parquet:0", 0)  # parquet rows are 0-based


def test_pairwise_implicit_jsonl_gz_prefix_whitespace(tmp_path):
    rows = [{"chosen": [_user("Tell me a joke"), _assistant("Why?"), _user("Just  do it "), _assistant("Knock knock.")],
             "rejected": [_user("Tell me a joke"), _assistant("Why?"), _user("Just do it"), _assistant("No.")]}]
    [record] = _read(_write_jsonl(tmp_path / "implicit.jsonl.gz", rows))
    assert record["prompt"] == rows[0]["chosen"][:3]  # the chosen side's text of the shared prefix
    assert record["responses"] == ["Knock knock.", "No."]


def test_hh_transcripts(tmp_path):
    prefix = "\n\nHuman: How do I bake bread?\n\nAssistant: With flour.\n\nHuman: And then?"
    rows = [
        {"chosen": prefix + "\n\nAssistant: Knead and bake it.", "rejected": prefix + "\n\nAssistant: No idea."},
        # the prefixes differ in whitespace; the chosen reply itself contains a fake "\n\nAssistant:" turn
        {"chosen": "\n\nHuman: Hi  there\n\nAssistant: Hello.\n\nAssistant: Anything else?",
         "rejected": "\n\nHuman: Hi there \n\nAssistant: What?"},
    ]
    first, second = _read(_write_jsonl(tmp_path / "hh.jsonl", rows), fmt="hh")
    assert first["prompt"] == [_user("How do I bake bread?"), _assistant("With flour."), _user("And then?")]
    assert first["responses"] == ["Knead and bake it.", "No idea."]
    assert second["prompt"] == [_user("Hi  there")]
    assert second["responses"] == ["Hello.\n\nAssistant: Anything else?", "What?"]


def test_ultrafeedback_binarized_saved_dataset_dict(tmp_path):
    def row(i, **scores):
        return {"prompt": f"Q{i}", "prompt_id": f"pid{i}", "chosen": [_user(f"Q{i}"), _assistant("good")],
                "rejected": [_user(f"Q{i}"), _assistant("bad")], **scores}

    folder = _save_to_disk(tmp_path / "ufb", {"train_prefs": [row(0, score_chosen=8.0, score_rejected=5.5), row(1)],
                                              "test_prefs": [row(2, score_chosen=7.0, score_rejected=1.0)]})
    first, second = _read(folder, split="train_prefs")
    assert first == {"id": "pid0", "kind": "pairwise", "prompt": [_user("Q0")], "responses": ["good", "bad"],
                     "objectives": ["score"], "scores": [[8.0, 5.5]], "source": str(folder / "train_prefs"), "row": 0}
    assert (second["objectives"], second["scores"]) == ([], [])  # no scores given: none invented
    assert len(list_source_files(str(folder))) > 3  # every file of the folder, for the cache fingerprint
    with pytest.raises(DataSourceError, match="available splits: train_prefs, test_prefs"):
        read_normalised(str(folder))


def test_saved_single_dataset(tmp_path):
    folder = _save_to_disk(tmp_path / "ds", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    [record] = _read(folder)
    assert (record["source"], record["row"], record["id"]) == (str(folder), 0, "ds:0")
    with pytest.raises(DataSourceError, match="without splits"):
        read_normalised(str(folder), split="train")


def test_listwise_objective_order(tmp_path):
    rows = [{"id": "l0", "prompt": [_user("Colour?")], "responses": ["Red.", "Blue.", "Green."],
             "scores": {"warmth": [1, 3, 2], "brevity": [3, 2.5, 1]}}]
    path = _write_jsonl(tmp_path / "lw.jsonl", rows)
    [record] = _read(path)
    assert record["kind"] == "listwise"
    assert (record["objectives"], record["scores"]) == (["brevity", "warmth"], [[3.0, 2.5, 1.0], [1.0, 3.0, 2.0]])
    [chosen_order] = _read(path, objectives=["warmth"])
    assert (chosen_order["objectives"], chosen_order["scores"]) == (["warmth"], [[1.0, 3.0, 2.0]])


def _completion(text, **ratings):
    return {"response": text, "annotations": {aspect: {"Rating": value, "Rationale": "..."}
                                              for aspect, value in ratings.items()}}


UF_ROW = {
    "instruction": "Write a haiku",
    "completions": [
        _completion("Leaves fall", helpfulness="4", honesty="5", instruction_following="3", truthfulness="N/A"),
        _completion("A poem", helpfulness="2", honesty="4", instruction_following="1", truthfulness="3"),
        _completion("Snow melts", helpfulness="5", honesty="5", instruction_following="5", truthfulness="5"),
    ],
}


@pytest.mark.parametrize("score_fill, truthfulness", [("min", 3.0), ("mean", 4.0), (0.5, 0.5)])
def test_ultrafeedback_raw_parquet_with_score_fill(tmp_path, score_fill, truthfulness):
    path = _write_parquet(tmp_path / "uf.parquet", [UF_ROW])
    [record] = _read(path, score_fill=score_fill)
    assert record["prompt"] == [_user("Write a haiku")]
    assert record["responses"] == ["Leaves fall", "A poem", "Snow melts"]
    assert record["objectives"] == ["helpfulness", "honesty", "instruction_following", "truthfulness"]
    assert record["scores"] == [[4, 2, 5], [5, 4, 5], [3, 1, 5], [truthfulness, 3, 5]]


def test_ultrafeedback_na_rating_without_fill_is_a_bad_score(tmp_path):
    records, [reject] = read_normalised(str(_write_parquet(tmp_path / "uf.parquet", [UF_ROW])))
    assert records == [] and (reject.reason, reject.row) == ("bad_score", 0)
    assert "'truthfulness'" in reject.detail and "'N/A'" in reject.detail and "score_fill" in reject.detail


@pytest.mark.parametrize("record, fmt", [
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, "pairwise_text"),
    ({"prompt": [_user("p")], "chosen": [_assistant("a")], "rejected": [_assistant("b")]}, "pairwise_messages"),
    ({"chosen": [_user("p"), _assistant("a")], "rejected": [_user("p"), _assistant("b")]}, "pairwise_implicit"),
    ({"chosen": "\n\nHuman: p\n\nAssistant: a", "rejected": "\n\nHuman: p\n\nAssistant: b"}, "hh"),
    ({"prompt": "p", "chosen": [_user("p"), _assistant("a")], "rejected": [_user("p"), _assistant("b")],
      "score_chosen": 9, "score_rejected": 2}, "ultrafeedback_binarized"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": {"x": [1, 2]}}, "listwise"),
    ({"instruction": "p", "completions": [_completion("a", honesty="1"), _completion("b", honesty="2")]},
     "ultrafeedback"),
])
def test_detect_format_and_normalise_each_format(record, fmt):
    assert detect_format(record) == fmt
    _, [out] = normalise_source([RawRow("mem.jsonl", 1, record)], fmt)
    assert out["prompt"] == [_user("p")] and out["responses"] == ["a", "b"], out


def test_detect_format_error_lists_formats_and_columns():
    with pytest.raises(FormatError) as err:
        detect_format({"question": "p", "answer": "a"})
    message = str(err.value)
    assert "['answer', 'question']" in message and "instruction (text), completions" in message
    assert all(f"\n  {fmt}: " in message for fmt in FORMATS)


# ---------------------------------------------------------------------------------------------- sources


def test_folder_is_read_recursively_in_sorted_order(tmp_path):
    hh = {"chosen": "\n\nHuman: p\n\nAssistant: a", "rejected": "\n\nHuman: p\n\nAssistant: b"}
    text = {"prompt": "p", "chosen": "a", "rejected": "b"}
    (tmp_path / "sub").mkdir()
    _write_jsonl(tmp_path / "b.jsonl", [text])
    _write_parquet(tmp_path / "sub" / "a.parquet", [text])
    _write_jsonl(tmp_path / "a.jsonl.gz", [hh, hh])
    (tmp_path / "notes.txt").write_text("not data")
    expected = [str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.jsonl"), str(tmp_path / "sub" / "a.parquet")]
    with pytest.warns(SkippedFilesWarning, match="skipping 1 file.*: notes.txt"):
        assert list_source_files(str(tmp_path)) == expected
    assert [(r.source, r.row) for r in iter_raw_rows(str(tmp_path))] == [
        (expected[0], 1), (expected[0], 2), (expected[1], 1), (expected[2], 0)]
    records = _read(tmp_path)  # each file's format detected on its own: hh, then pairwise_text
    # default ids name the file by its path under the folder read (a.parquet alone could clash)
    assert [r["id"] for r in records] == ["a.jsonl.gz:1", "a.jsonl.gz:2", "b.jsonl:1", "sub/a.parquet:0"]
    _write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "responses": ["a", "b"], "scores": {"x": [1, 2]}}])
    with pytest.raises(FormatError, match="all pairwise or all listwise"):
        read_normalised(str(tmp_path))


@pytest.mark.parametrize("corrupt", [
    lambda gz: gz + b"not a gzip member",  # a bad second member
    lambda gz: gz[:-12],  # a truncated stream
])
def test_bad_gzip_member_rejects_the_whole_file(tmp_path, corrupt):
    """Issue 15: a truncated .jsonl.gz gave its readable rows and ONE reject, so the lost rest counted as one
    bad row. Now the file fails as a whole: every row read is a damaged_file reject, plus one for the rest."""
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(3)]
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(corrupt(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in rows))))
    good = _write_jsonl(tmp_path / "good.jsonl", rows)
    records, rejects = read_normalised(str(tmp_path))
    assert [r["source"] for r in records] == [str(good)] * 3
    n_read = len(rejects) - 1  # the rows read before the damage (2 or 3), then the row for the rest
    assert n_read >= 2 and {r.reason for r in rejects} == {"damaged_file"}
    assert {r.source for r in rejects} == {str(path)}
    assert [r.row for r in rejects] == list(range(1, n_read + 2))
    assert "cannot be read from here on" in rejects[-1].detail
    assert all(f"cannot be read to its end (from line {n_read + 1}: " in r.detail and "whole file is rejected"
               in r.detail for r in rejects[:-1])
    assert json.loads(rejects[0].raw) == rows[0]  # the row itself is in the rejects file


def test_source_errors_are_clear(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="no such file or folder"):
        list_source_files(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataSourceError, match=r"unsupported file type; valid: \.jsonl, \.jsonl\.gz, \.parquet"):
        list_source_files(str(tmp_path / "data.csv"))
    with pytest.raises(DataSourceError, match="holds no .jsonl"):
        list_source_files(str(tmp_path / "empty"))
    path = _write_jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataSourceError, match="applies only to Hugging Face datasets"):
        read_normalised(str(path), split="train")
    with pytest.raises(FormatError, match="unknown format 'dpo'; valid: auto, pairwise_text"):
        read_normalised(str(path), fmt="dpo")
    with pytest.raises(ValueError, match="score_fill='max'; valid"):
        read_normalised(str(path), score_fill="max")


def test_unreachable_hub_error_suggests_a_local_path():
    code = "from mallows_ray.data.normalise import read_normalised; read_normalised('nobody-x/no-such-dataset-x')"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mallows_ray.data.sources.DataSourceError: 'nobody-x/no-such-dataset-x'"), done.stderr
    assert "hub is unreachable" in last and "Give a local path instead" in last


# ---------------------------------------------------------------------------------------------- rejects

GOOD = {"id": "g1", "prompt": "Colour?", "responses": ["Red.", "Blue."], "scores": {"x": [2, 1], "y": [1, 2]}}
BAD_LINES = [  # (line, reason); line numbers are 1-based and count the blank line
    (json.dumps(GOOD), None),
    ("{not json", "undecodable"),
    ("[1, 2]", "undecodable"),
    (b'{"prompt": "caf\xe9"}', "undecodable"),
    (json.dumps({"prompt": "p", "responses": ["a", "b"]}), "missing_field"),
    (json.dumps({**GOOD, "id": "g2", "scores": {"x": [2, 1]}}), "missing_field"),  # no objective y
    ("", None),
    (json.dumps({**GOOD, "id": "g3", "responses": ["Red.", "  \n"]}), "empty_response"),
    (json.dumps({**GOOD, "id": "g4", "responses": ["Same  answer", "Same answer"]}), "identical_responses"),
    (json.dumps({**GOOD, "id": "g5", "scores": {"x": [2, "N/A"], "y": [1, 2]}}), "bad_score"),
    (json.dumps({**GOOD, "id": "g6", "scores": {"x": [2, float("nan")], "y": [1, 2]}}), "bad_score"),
    (json.dumps({**GOOD, "id": "g7", "scores": {"x": [2, None], "y": [1, 2]}}), "bad_score"),
    (json.dumps({**GOOD, "id": "g8", "scores": {"x": [2, 1, 0], "y": [1, 2]}}), "length_mismatch"),
    (json.dumps({**GOOD, "id": "g9", "responses": ["Red."], "scores": {"x": [2], "y": [1]}}), "too_few_responses"),
    (json.dumps({**GOOD, "id": "g10", "prompt": [{"role": "bot", "content": "hi"}]}), "bad_messages"),
    (json.dumps({**GOOD, "id": "g11", "prompt": [_user("hi"), _assistant("ho")]}), "bad_messages"),
    (json.dumps({**GOOD, "id": "g12", "prompt": "   "}), "empty_prompt"),
    (json.dumps({**GOOD, "id": "g13", "responses": ["Red.", 7]}), "bad_field"),
    (json.dumps({**GOOD, "prompt": "Colour? " + "x" * 2000}), "duplicate_id"),
    (json.dumps({**GOOD, "id": "g14"}), None),
]


def _bad_file(tmp_path):
    return _write_jsonl(tmp_path / "mixed.jsonl", [], [line for line, _ in BAD_LINES])


def test_every_kind_of_bad_row_is_rejected_with_its_row(tmp_path):
    path = _bad_file(tmp_path)
    records, rejects = read_normalised(str(path))
    expected = [(n, reason) for n, (_, reason) in enumerate(BAD_LINES, start=1) if reason]
    assert [(r.row, r.reason) for r in rejects] == expected, [r.describe() for r in rejects]
    assert [r["id"] for r in records] == ["g1", "g14"]
    assert len(records) + len(rejects) == sum(1 for line, _ in BAD_LINES if line)  # the blank line is no row
    assert {r.source for r in rejects} == {str(path)}
    assert set(REASONS) >= {r.reason for r in rejects} | {"prompt_too_long"}
    assert summarise_rejects(rejects) == {"bad_field": 1, "bad_messages": 2, "bad_score": 3, "duplicate_id": 1,
                                          "empty_prompt": 1, "empty_response": 1, "identical_responses": 1,
                                          "length_mismatch": 1, "missing_field": 2, "too_few_responses": 1,
                                          "undecodable": 3}
    by_row = {r.row: r for r in rejects}
    assert "'y'" in by_row[6].detail and "has: x" in by_row[6].detail  # names the objective that is missing
    assert "3 scores for 2 responses" in by_row[13].detail
    assert "already used by" in by_row[19].detail and "mixed.jsonl:1" in by_row[19].detail


def test_rejects_file_and_bad_fraction_gate(tmp_path):
    records, rejects = read_normalised(str(_bad_file(tmp_path)))
    path = tmp_path / "out" / "rejects.jsonl"
    with RejectsFile(path) as out:
        for reject in rejects:
            out.add(reject)
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(w["row"], w["reason"]) for w in written] == [(r.row, r.reason) for r in rejects]
    assert set(written[0]) == {"source", "row", "reason", "detail", "raw"}
    assert written[0]["raw"] == "{not json"
    duplicate = next(w for w in written if w["reason"] == "duplicate_id")
    assert len(duplicate["raw"]) < 600 and duplicate["raw"].endswith("more chars]")  # truncated copy

    n_bad, n_total = len(rejects), len(rejects) + len(records)
    check_bad_fraction(n_bad, n_total, 0.9, path)
    with pytest.raises(DataValidationError) as err:
        check_bad_fraction(n_bad, n_total, 0.0, path)
    message = str(err.value)
    assert f"{n_bad} of {n_total} rows rejected" in message and "max_bad_fraction=0.0" in message
    assert "bad_score=3" in message and "undecodable=3" in message and str(path) in message
    source = rejects[0].source  # examples: the first reject of each of the first three reasons
    assert f"e.g. {source}:2 undecodable not valid JSON" in message
    assert f"e.g. {source}:5 missing_field no 'scores' field (has: prompt, responses)" in message
    assert f"e.g. {source}:8 empty_response responses[1] is empty" in message
    assert message.count("e.g. ") == 3


def test_reject_reasons_are_a_fixed_set():
    with pytest.raises(ValueError, match="unknown reject reason 'oops'; valid: undecodable, missing_field"):
        Reject("f.jsonl", 1, "oops", "detail")


# ---------------------------------------------------------------------------------------------- real data


def test_real_hh_file_first_200_rows():
    path = HH_DIR / "harmless-base-test-1800.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"real HH data not present at {HH_DIR}")
    _, outs = normalise_source(list(islice(iter_raw_rows(str(path)), 200)), "hh")
    rejects = [out for out in outs if isinstance(out, Reject)]
    records = [out for out in outs if not isinstance(out, Reject)]
    # the data's own flaw: row 87's chosen reply is empty ("...\n\nAssistant: " and nothing after it)
    assert [r.describe() for r in rejects] == [f"{path}:87 empty_response chosen is empty or whitespace-only"]
    assert len(records) == 199 and [r["row"] for r in records] == [n for n in range(1, 201) if n != 87]
    assert detect_format(next(iter_raw_rows(str(path))).record) == "hh"
    for record in records:
        assert record["prompt"][-1]["role"] == "user" and record["prompt"][-1]["content"]
        assert [m["role"] for m in record["prompt"]] == ["user", "assistant"] * (len(record["prompt"]) // 2) + ["user"]
        assert all(r.strip() and "\n\nHuman:" not in r for r in record["responses"])


def test_every_format_has_a_config_name_a_normaliser_and_a_kind():
    """The format names live in the config's Literal (checked at load), detect.py and normalisers.py: the same
    set in all three."""
    import typing

    from mallows_ray.config import DataConfig
    from mallows_ray.data.detect import FORMAT_COLUMNS, KINDS
    from mallows_ray.data.normalisers import NORMALISERS

    config_names = set(typing.get_args(typing.get_type_hints(DataConfig)["format"]))
    assert config_names == {"auto", *FORMATS}
    assert set(NORMALISERS) == set(FORMAT_COLUMNS) == set(KINDS) == set(FORMATS)
