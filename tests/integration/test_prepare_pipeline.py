"""The preparation pipeline on a real local Ray instance: 2 scoring actors, a tiny real model, real parquet.

Checks the reference columns against a direct single-process computation from full logits, the dispersion
column against the manifest's c, rejects and the bad-fraction gate, and cache reuse / invalidation.
"""

import json
import math

import pyarrow.parquet as pq
import pytest
import torch
from preference_data import prepare_config

from mallows_ray.data.pipeline import prepare
from mallows_ray.data.rejects import DataValidationError
from mallows_ray.data.tokenize import LengthLimits, tokenize_record
from mallows_ray.models import load_model, load_tokenizer

PAIRS = [
    {"id": f"p{i}", "prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f"It is {2 * i}.",
     "rejected": "I do not know, and I will not tell you." + " no" * i}
    for i in range(10)
]
LISTWISE = [
    {"id": f"l{i}", "prompt": f"Name a colour ({i})", "responses": ["Red.", "Blue is nice.", f"Green {i}"],
     "scores": {"brevity": [3, 2, 1 + i % 3], "warmth": [1, 3, 2]}}
    for i in range(6)
]


def _write_jsonl(path, rows, extra_lines=()):
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
        for line in extra_lines:
            fh.write(line + "\n")
    return path


def _config(tmp_path, model_dir, train, **overrides):
    return prepare_config(tmp_path / "cache", model_dir, train, **{
        "data.scoring.num_actors": 2, "data.scoring.batch_size": 3, "data.max_prompt_length": 48,
        "data.max_response_length": 24, **overrides})


def _naive_reference(model, tokenizer, record, limits):
    """Full-vocabulary logits, log_softmax and entropy, one response at a time: the obvious computation."""
    tok = tokenize_record(tokenizer, record, limits)
    logps, counts, entropies, tokens = [], [], [], []
    for response in tok["response_ids"]:
        ids = torch.tensor([tok["prompt_ids"] + response])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()  # [T-1, V]: position t predicts t+1
        targets = ids[0, 1:]
        start = len(tok["prompt_ids"]) - 1
        logp = torch.log_softmax(logits, -1)
        token_logp = logp.gather(-1, targets[:, None])[:, 0][start:]
        entropy = -(logp.exp() * logp).sum(-1)[start:] / math.log(logits.shape[-1])
        logps.append(token_logp.sum().item())
        counts.append(len(response))
        entropies.append(entropy.mean().item())
        tokens.append(token_logp)
    shared = [t[:min(counts)].sum().item() for t in tokens]  # LD-DPO: the first l = min(n(y_w), n(y_l)) tokens
    return logps, counts, entropies, shared


def test_pairwise_scores_match_direct_computation(ray_local, tmp_path, tiny_model_dir):
    bad = ['{"id": "bad1", "prompt": "x", "chosen": "same", "rejected": "same"}', "{not json"]
    train = _write_jsonl(tmp_path / "train.jsonl", PAIRS, bad)
    config = _config(tmp_path, tiny_model_dir, train, **{"data.max_bad_fraction": 0.2})
    prepared = prepare(config)

    manifest = prepared.manifest
    split = manifest["splits"]["train"]
    assert (split["rows_in"], split["rows_out"], split["rejected"]) == (12, 10, 2)
    assert manifest["rejects"]["by_reason"] == {"identical_responses": 1, "undecodable": 1}
    rejects = [json.loads(line) for line in open(manifest["rejects"]["file"])]
    assert sorted(r["row"] for r in rejects) == [11, 12]  # 1-based line numbers in train.jsonl

    parquet = pq.read_table(prepared.folder / "train")  # the split folder reads as plain parquet
    assert "dispersion" not in parquet.column_names  # s(x) is computed where rows are read, from c and Hbar(x)
    read = prepared.split("train").take(range(parquet.num_rows))  # through the random-access twin
    columns = [c for c in read[0] if c != "dispersion"]
    assert [{c: row[c] for c in columns} for row in read] == parquet.select(columns).to_pylist()
    table = [{**row, "dispersion": r["dispersion"]} for row, r in zip(parquet.to_pylist(), read)]
    assert [row["id"] for row in table] == sorted(p["id"] for p in PAIRS)
    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    limits = LengthLimits(48, 24)
    for row in table:
        logps, counts, entropies, shared = _naive_reference(model, tokenizer, row, limits)
        assert row["ref_token_counts"] == counts
        assert row["ref_logps"] == pytest.approx(logps, abs=1e-4)
        assert row["ref_shared_logps"] == pytest.approx(shared, abs=1e-4)
        assert row["ref_entropy"] == pytest.approx(entropies, abs=1e-5)
        assert row["hbar"] == pytest.approx(sum(entropies) / 2, abs=1e-5)
        c = manifest["dispersion_scale"]
        assert row["dispersion"] == pytest.approx(-c * math.log(row["hbar"]), rel=1e-5)
    # c = auto calibrates the mean s(x) over train to 1
    assert sum(r["dispersion"] for r in table) / len(table) == pytest.approx(1.0, rel=1e-4)
    assert any(row["response_truncated"] != [False, False] for row in table)  # the long rejections were cut
    assert split["truncated_responses"] >= 1


def test_cache_reuse_and_invalidation(ray_local, tmp_path, tiny_model_dir):
    train = _write_jsonl(tmp_path / "train.jsonl", PAIRS[:4])
    first = prepare(_config(tmp_path, tiny_model_dir, train))
    again = prepare(_config(tmp_path, tiny_model_dir, train))
    assert again.folder == first.folder and again.manifest == first.manifest
    assert (first.folder / "rejects.jsonl").read_text() == ""  # written, empty, when no row is rejected
    changed_setting = prepare(_config(tmp_path, tiny_model_dir, train, **{"data.max_response_length": 16}))
    assert changed_setting.folder != first.folder
    _write_jsonl(train, PAIRS[:5])
    changed_data = prepare(_config(tmp_path, tiny_model_dir, train))
    assert changed_data.folder not in (first.folder, changed_setting.folder)
    assert changed_data.manifest["splits"]["train"]["rows_out"] == 5


def test_bad_fraction_gate_and_prompt_too_long(ray_local, tmp_path, tiny_model_dir):
    rows = PAIRS[:3] + [{"id": "long", "prompt": "word " * 200, "chosen": "a", "rejected": "b"}]
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    # the long prompt is cut to 400 tokens, which leaves no room under max_length=100: a reject
    limits = {"data.max_prompt_length": 400, "data.max_response_length": 8, "data.max_length": 100}
    with pytest.raises(DataValidationError) as err:
        prepare(_config(tmp_path, tiny_model_dir, train, **limits))  # default max_bad_fraction = 0
    message = str(err.value)
    assert "prompt_too_long" in message and "1" in message and "rejects.jsonl" in message
    prepared = prepare(_config(tmp_path, tiny_model_dir, train, **limits, **{"data.max_bad_fraction": 0.25}))
    assert prepared.manifest["rejects"]["by_reason"] == {"prompt_too_long": 1}
    assert prepared.manifest["splits"]["train"]["rows_out"] == 3


def test_listwise_with_validation_split(ray_local, tmp_path, tiny_model_dir):
    train = _write_jsonl(tmp_path / "train.jsonl", LISTWISE[:4])
    validation = _write_jsonl(tmp_path / "validation.jsonl", LISTWISE[4:])
    prepared = prepare(_config(tmp_path, tiny_model_dir, train, **{"data.validation": validation,
                                                                   "data.scoring.batch_size": 2}))
    assert prepared.manifest["kind"] == "listwise"
    assert {s: v["rows_out"] for s, v in prepared.manifest["splits"].items()} == {"train": 4, "validation": 2}
    assert all(len(r["ref_entropy"]) == 3 for r in pq.read_table(prepared.folder / "validation").to_pylist())
    assert pq.read_table(prepared.folder / "validation").column("objectives")[0].as_py() == ["brevity", "warmth"]
    rows = prepared.split("validation").take(range(2))
    assert all(len(r["ref_logps"]) == 3 for r in rows)
    # validation dispersion uses the c calibrated on train
    c = prepared.manifest["dispersion_scale"]
    assert rows[0]["dispersion"] == pytest.approx(-c * math.log(rows[0]["hbar"]), rel=1e-5)


def test_output_is_the_same_whatever_the_number_of_actors(ray_local, tmp_path, tiny_model_dir):
    """The scored files are byte for byte the same with 1 and 2 scoring actors (blocks of 2 rows, so the
    two actors finish out of order), in reading order; each file is listed in the manifest."""
    train = _write_jsonl(tmp_path / "train.jsonl", PAIRS)
    folders = {}
    for actors in (1, 2):
        config = _config(tmp_path / str(actors), tiny_model_dir, train,
                         **{"data.scoring.num_actors": actors, "data.scoring.batch_size": 2})
        folders[actors] = prepare(config).folder
    files = {actors: sorted((folder / "train").glob("*.parquet")) for actors, folder in folders.items()}
    assert [f.name for f in files[1]] == [f.name for f in files[2]] == ["part-00000.parquet"]
    assert [f.read_bytes() for f in files[1]] == [f.read_bytes() for f in files[2]]
    assert pq.read_table(files[2][0], columns=["id"]).column("id").to_pylist() == [p["id"] for p in PAIRS]
