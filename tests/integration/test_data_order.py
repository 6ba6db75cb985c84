"""Training order over a dataset stored source by source, on a real local Ray instance: two source files
(every row of a.jsonl sorts before every row of b.jsonl, ids default to `<file>:<line>`), prepared and
trained on 2 workers. Each epoch is a seeded permutation of the whole split, so both files are mixed from
the first steps on, and each epoch starts differently. Bad lines in both files are rejects naming their file
and line."""

import json
from pathlib import Path

import pytest
from preference_data import config_from, yes_no_pairs

PER_FILE = 160
MICRO, WORKERS = 8, 2
STEPS_PER_EPOCH = 2 * PER_FILE // (MICRO * WORKERS)  # 20


# both files hold prompts of the same length distribution (3-digit numbers), so that length grouping, which
# batches prompts of similar length, does not itself separate the files
def _write(path, rows, bad_lines):
    """jsonl of `rows` without ids, then `bad_lines` (each a rejected line); returns the path."""
    lines = [json.dumps({k: v for k, v in row.items() if k != "id"}) for row in rows] + bad_lines
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def two_file_run(ray_local, tiny_model_dir, tmp_path_factory):
    from mallows_ray.drivers.train import run_training

    folder = tmp_path_factory.mktemp("two-files")
    data = folder / "data"
    data.mkdir()
    _write(data / "a.jsonl", yes_no_pairs(PER_FILE, 100), ["{not json"])
    _write(data / "b.jsonl", yes_no_pairs(PER_FILE, 300), ['{"prompt": "q", "chosen": "same", "rejected": "same"}'])
    items = {"model.name_or_path": tiny_model_dir, "data.train": data, "data.cache_dir": folder / "cache",
             "data.max_prompt_length": 48, "data.max_response_length": 24, "data.scoring.batch_size": 16,
             "data.max_bad_fraction": 0.01, "loss.name": "dpo", "optim.lr": 1e-3, "optim.warmup_steps": 0,
             "optim.max_steps": STEPS_PER_EPOCH + 1, "batch.micro_batch_size": MICRO, "scaling.num_workers": WORKERS,
             "deepspeed.zero_stage": 2, "run.checkpoint_every": 0, "run.eval_every": 0, "run.log_every": 1,
             "run.storage_path": folder / "runs", "run.name": "two-files", "export.enabled": False}
    return run_training(config_from(items)), data


def _steps(result):
    """{step: ids of that step over both ranks, in rank order}."""
    per_rank = [{line["step"]: line["ids"] for line in map(json.loads, open(Path(result.run_dir) / "examples" /
                                                                               f"rank{rank}.jsonl"))}
                for rank in range(WORKERS)]
    return {step: per_rank[0][step] + per_rank[1][step] for step in per_rank[0]}


def test_both_files_are_mixed_from_the_first_steps_and_each_epoch_starts_anew(two_file_run):
    result, _ = two_file_run
    steps = _steps(result)
    assert sorted(steps) == list(range(1, STEPS_PER_EPOCH + 2))
    epoch0 = [i for step in range(1, STEPS_PER_EPOCH + 1) for i in steps[step]]
    assert len(epoch0) == len(set(epoch0)) == 2 * PER_FILE  # every row once
    head = [i for step in range(1, STEPS_PER_EPOCH // 10 + 1) for i in steps[step]]  # the first tenth of the steps
    share_a = sum(i.startswith("a.jsonl:") for i in head) / len(head)
    share_b = sum(i.startswith("b.jsonl:") for i in head) / len(head)
    assert share_a + share_b == 1.0 and 0.3 <= share_a <= 0.7 and 0.3 <= share_b <= 0.7, (share_a, head)
    assert steps[STEPS_PER_EPOCH + 1] != steps[1]  # epoch 1's first step is not epoch 0's
    # each rank read its half of every global batch, no more
    assert result.metrics["data/rows_read_max"] <= 1.05 * (STEPS_PER_EPOCH + 1) * MICRO


def test_every_reject_of_a_multi_file_input_names_its_file_and_line(two_file_run):
    result, data = two_file_run
    manifest = json.loads((Path(result.plan.data_folder) / "manifest.json").read_text())
    rejects = [json.loads(line) for line in open(manifest["rejects"]["file"])]
    assert sorted((Path(r["source"]).name, r["row"], r["reason"]) for r in rejects) == [
        ("a.jsonl", PER_FILE + 1, "undecodable"), ("b.jsonl", PER_FILE + 1, "identical_responses")]
    assert all(Path(r["source"]).parent == data for r in rejects)
    assert manifest["splits"]["train"]["rows_in"] == 2 * PER_FILE + 2
