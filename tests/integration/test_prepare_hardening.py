"""Issue 15 on a real local Ray instance: the bad-row gate on a reused cache, the rebuild of a damaged cache,
identical-after-truncation rejects, and the rejects file when every row is bad."""

import json
import os

import pyarrow.parquet as pq
import pytest
from preference_data import prepare_config

from mallows_ray.data.pipeline import prepare
from mallows_ray.data.rejects import DataValidationError

GOOD = [{"id": f"g{i}", "prompt": f"Question {i}?", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(4)]
# differ only after the first 8 tokens (the byte-level tiny tokenizer: one token per byte)
SAME_START = {"id": "t", "prompt": "Tell me", "chosen": "the same long start, then A",
              "rejected": "the same long start, then B"}


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _config(tmp_path, model_dir, train, **overrides):
    return prepare_config(tmp_path / "cache", model_dir, train, **{
        "data.scoring.num_actors": 1, "data.scoring.batch_size": 4, "data.max_prompt_length": 32,
        "data.max_response_length": 8, **overrides})


def test_gate_on_reuse_and_damaged_cache_rebuilt(ray_local, tmp_path, tiny_model_dir, capsys):
    train = _write_jsonl(tmp_path / "train.jsonl", [*GOOD, SAME_START, "{not json"])
    prepared = prepare(_config(tmp_path, tiny_model_dir, train, **{"data.max_bad_fraction": 0.4}))
    manifest = prepared.manifest
    assert manifest["rejects"]["by_reason"] == {"identical_after_truncation": 1, "undecodable": 1}
    assert (manifest["splits"]["train"]["rows_in"], manifest["splits"]["train"]["rows_out"]) == (6, 4)
    rejects = [json.loads(line) for line in open(prepared.folder / "rejects.jsonl")]
    assert sorted((r["row"], r["reason"]) for r in rejects) == [(5, "identical_after_truncation"), (6, "undecodable")]
    manifest_file = prepared.folder / "manifest.json"
    stamp = os.stat(manifest_file).st_mtime_ns

    # the same data and settings with a stricter gate: the cache is found, and the gate refuses it
    with pytest.raises(DataValidationError) as err:
        prepare(_config(tmp_path, tiny_model_dir, train, **{"data.max_bad_fraction": 0.1}))
    assert "2 of 6 rows rejected (33.33%), more than max_bad_fraction=0.1" in str(err.value)
    assert str(prepared.folder / "rejects.jsonl") in str(err.value)
    assert "identical_after_truncation=1" in str(err.value)
    assert os.stat(manifest_file).st_mtime_ns == stamp  # refused as it is, not rebuilt

    # a truncated split parquet: named, and the entry is rebuilt
    part = prepared.folder / "train" / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:-100])
    capsys.readouterr()
    rebuilt = prepare(_config(tmp_path, tiny_model_dir, train, **{"data.max_bad_fraction": 0.4}))
    out = capsys.readouterr().out
    assert f"rebuilding the damaged scored cache: {part}: " in out and "(truncated or changed)" in out
    assert rebuilt.folder == prepared.folder and os.stat(manifest_file).st_mtime_ns != stamp
    assert pq.read_table(part).num_rows == 4


def test_every_row_bad_still_writes_the_rejects_file(ray_local, tmp_path, tiny_model_dir):
    train = _write_jsonl(tmp_path / "bad.jsonl", ["{not json", {"question": "q"}, {**GOOD[0], "rejected": "yes 0"}])
    rejects_files = lambda: list((tmp_path / "cache").glob("*/rejects.jsonl"))  # noqa: E731
    with pytest.raises(DataValidationError, match="3 of 3 rows rejected"):
        prepare(_config(tmp_path, tiny_model_dir, train))
    [path] = rejects_files()
    reasons = [json.loads(line)["reason"] for line in open(path)]
    assert reasons == ["undecodable", "missing_field", "identical_responses"]
    path.unlink()
    with pytest.raises(ValueError, match=r"no usable rows \(3 of 3 rejected; see .*rejects.jsonl\)"):
        prepare(_config(tmp_path, tiny_model_dir, train, **{"data.max_bad_fraction": 1.0}))
    [path] = rejects_files()
    assert len(path.read_text().splitlines()) == 3


def test_scoring_actors_asking_for_more_than_a_local_instance_has_are_refused(ray_local, tmp_path, tiny_model_dir):
    """No autoscaler adds a GPU or CPUs to a local instance: actors asking for more than it has would wait
    forever, so prepare says which settings ask for what it lacks instead."""
    train = _write_jsonl(tmp_path / "train.jsonl", GOOD)
    with pytest.raises(ValueError, match=r"data\.scoring\.num_actors=1 x num_gpus_per_actor=1 ask for 1 GPU; "
                                         r"this machine's Ray instance has 0 GPU"):
        prepare(_config(tmp_path, tiny_model_dir, train, **{"data.scoring.num_gpus_per_actor": 1}))
    with pytest.raises(ValueError, match=r"num_actors=1 x num_cpus_per_actor=5 ask for 5 CPU; this machine's Ray "
                                         r"instance has 4 CPU"):  # the fixture's 4 logical CPUs
        prepare(_config(tmp_path, tiny_model_dir, train, **{"data.scoring.num_cpus_per_actor": 5}))
