"""Distributed training on a real local Ray instance: 2 CPU workers (gloo), DeepSpeed ZeRO-2 / ZeRO-3, a tiny
Llama, a learnable preference set (every chosen response starts with "yes", every rejected one with "no").

Each Ray Train run takes ~25 s here, so runs are shared: `trained("zero3")` is the reference of the resume and
fault-tolerance tests, `trained("zero2")` the reference of the invariance test. Final parameters are compared
through the HF export of each run.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from background import in_thread
from preference_data import config_from as _config
from preference_data import write_jsonl as _write_jsonl
from preference_data import yes_no_pairs as _pairs
from safetensors.torch import load_file

from mallows_ray.data.pipeline import prepare
from mallows_ray.data.scored_split import ScoredSplit
from mallows_ray.train.batches import epoch_order, rank_slice, token_budget_batches

TRAIN_ROWS, VALIDATION_ROWS = 32, 7  # 7: the last evaluation batch is short, so a rank pads its share
STEPS = 16  # 2 epochs of 32 prompts in global batches of 4

BASE = {
    "data.max_prompt_length": 48, "data.max_response_length": 24, "data.scoring.batch_size": 8,
    "loss.name": "mallows_theta", "loss.beta": 0.1,
    "optim.lr": 5e-3, "optim.schedule": "linear", "optim.warmup_steps": 2, "optim.epochs": 2,
    "batch.micro_batch_size": 2, "batch.gradient_accumulation": 1, "scaling.num_workers": 2,
    "deepspeed.zero_stage": 3, "run.checkpoint_every": 4, "run.eval_every": 8, "run.log_every": 1,
}
RUNS = {
    "zero3": {},
    "zero2": {"deepspeed.zero_stage": 2},
    "zero2_1x2": {"deepspeed.zero_stage": 2, "scaling.num_workers": 1, "batch.gradient_accumulation": 2},
    "zero2_compiled": {"deepspeed.zero_stage": 2, "model.compile": True},
    "lora": {"deepspeed.zero_stage": 2, "model.lora": "{rank: 4, alpha: 8}", "model.gradient_checkpointing": True,
             "export.merge_lora": True, "optim.lr": 2e-2},
}


@pytest.fixture(scope="module")
def scored(ray_local, tiny_model_dir, tmp_path_factory):
    """The preference set prepared once (tokenized, reference-scored) with the tiny model."""
    folder = tmp_path_factory.mktemp("prefs")
    items = {"model.name_or_path": tiny_model_dir, "data.cache_dir": folder / "cache",
             "data.train": _write_jsonl(folder / "train.jsonl", _pairs(TRAIN_ROWS, 0)),
             "data.validation": _write_jsonl(folder / "validation.jsonl", _pairs(VALIDATION_ROWS, 100)),
             **{k: v for k, v in BASE.items() if k.startswith("data.")}}
    return prepare(_config(items))


@pytest.fixture(scope="module")
def trained(scored, tiny_model_dir, tmp_path_factory):
    """`trained(name)`: the TrainResult of RUNS[name], trained once per module."""
    from mallows_ray.drivers.train import run_training

    storage = tmp_path_factory.mktemp("runs")
    results = {}

    def run(name, **overrides):
        if name not in results:
            items = {**BASE, "model.name_or_path": tiny_model_dir, "data.train": scored.folder,
                     "run.storage_path": storage, "run.name": name, **RUNS.get(name, {}), **overrides}
            results[name] = run_training(_config(items))
        return results[name]

    return run


def _weights(result):
    return load_file(Path(result.export_dir) / "model.safetensors")


def _max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _steps_from_example_logs(result, world):
    """{step: ids of that step over all ranks, in rank order}; the last line of a step wins (restarts redo steps)."""
    per_rank = []
    for rank in range(world):
        lines = [json.loads(line) for line in open(Path(result.run_dir) / "examples" / f"rank{rank}.jsonl")]
        per_rank.append({line["step"]: line["ids"] for line in lines})
    return {step: [i for rank in per_rank for i in rank[step]] for step in per_rank[0]}


def _assert_learned(result, policy_is_reference_bitwise=True):
    """`policy_is_reference_bitwise`: the policy's first forward is the (eager) reference scoring's, bit for bit;
    compiled layers round differently, so its step-1 rewards are float noise around 0 instead of exactly 0."""
    first, last = result.history[0], result.history[-1]
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    if policy_is_reference_bitwise:
        assert first["rewards/accuracy"] == 0.0  # rewards are exactly 0 at step 1: no chosen > rejected yet
    else:
        assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5
    assert last["step"] == STEPS and last["loss"] < 0.1 and last["rewards/accuracy"] == 1.0
    assert last["eval/examples"] == VALIDATION_ROWS
    assert last["eval/loss"] < 0.1 and last["eval/rewards/accuracy"] == 1.0 and last["eval/rewards/margin"] > 1.0
    for key in ("rewards/chosen", "rewards/rejected", "dispersion/mean", "grad_norm", "lr", "tokens_per_s",
                "samples_per_s"):
        assert math.isfinite(last[key])


def test_zero3_learns_and_shards_parameters(trained):
    result = trained("zero3")
    _assert_learned(result)
    metrics = result.metrics
    # every rank holds about half of the parameters (its ZeRO-3 partition); min and max over the ranks
    assert 0.49 < metrics["params/local_fraction_min"] <= metrics["params/local_fraction_max"] < 0.52
    assert metrics["params/trainable"] == metrics["params/total"]
    # the export is a regular HF folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(result.export_dir)
    assert sum(p.numel() for p in model.parameters()) == metrics["params/total"]
    assert AutoTokenizer.from_pretrained(result.export_dir).chat_template
    # a checkpoint every 4 steps, the default run.keep_checkpoints=2 newest kept
    assert sorted(p.name for p in Path(result.run_dir).glob("ckpt_step*")) == ["ckpt_step000012", "ckpt_step000016"]
    assert Path(result.checkpoint).name == f"ckpt_step{STEPS:06d}"
    # both ranks' files were renamed into place from the run folder's staging folder, which is gone
    assert not (Path(result.run_dir) / ".staging").exists()
    record = json.loads((Path(result.checkpoint) / "mallows_ray_checkpoint.json").read_text())
    assert {"rng_rank0.safetensors", "rng_rank1.safetensors"} <= {Path(name).name for name in record["files"]}
    for name, (size, _) in record["files"].items():
        assert (Path(result.checkpoint) / name).stat().st_size == size


def test_zero2_learns(trained):
    result = trained("zero2")
    _assert_learned(result)
    assert result.metrics["params/local_fraction_min"] == result.metrics["params/local_fraction_max"] == 1.0
    # ZeRO-2 and ZeRO-3 take the same steps: same data order, same maths
    assert _max_abs_diff(_weights(result), _weights(trained("zero3"))) < 1e-5


@pytest.mark.slow  # each worker compiles the decoder layers before its first step (~1 minute here)
def test_compiled_layers_learn_and_take_the_eager_steps(trained):
    result = trained("zero2_compiled")
    _assert_learned(result, policy_is_reference_bitwise=False)
    # fused kernels round differently; 16 AdamW steps of lr 5e-3 carry that, no more
    assert _max_abs_diff(_weights(result), _weights(trained("zero2"))) < 1e-4


def test_one_worker_accumulating_two_equals_two_workers(trained):
    """1 worker x gradient accumulation 2 == 2 workers x 1: the same micro-batches, the same mean gradient."""
    single, pair = trained("zero2_1x2"), trained("zero2")
    assert single.plan.global_batch_size == pair.plan.global_batch_size == 4
    assert [h["loss"] for h in single.history] == pytest.approx([h["loss"] for h in pair.history], abs=1e-5)
    diff = _max_abs_diff(_weights(single), _weights(pair))
    print(f"invariance: max |param diff| after {STEPS} steps = {diff:.3g}")
    assert diff < 1e-5  # float32 reduction order only (all-reduce mean vs accumulation)
    assert _steps_from_example_logs(single, 1) == _steps_from_example_logs(pair, 2)
    # scaling.threads_per_worker=0: the machine's CPUs shared among the run's workers on it
    usable = len(os.sched_getaffinity(0))
    assert single.metrics["threads_per_worker"] == usable and pair.metrics["threads_per_worker"] == max(1, usable // 2)


def _budget_with_uneven_steps(folder: Path) -> int:
    """The smallest token budget under which, in the first epoch, some step's two rank shares both run whole
    and some other step's need one micro-batch on one rank and two on the other (prompts of similar lengths)."""
    split = ScoredSplit(folder / "train", 1.0)
    lengths = split.padded_lengths(share_prompt=True)
    rows = split.take(range(len(split)))
    order = epoch_order(len(split), global_batch_size=4, seed=0, epoch=0, shuffle=True, lengths=lengths)
    for budget in range(2 * int(lengths.min()), 2 * int(lengths.max())):
        counts = {tuple(len(token_budget_batches([rows[i] for i in rank_slice(batch, rank, 2)], budget, group=1,
                                                 share_prompt=True, pack=True)) for rank in range(2))
                  for batch in order}
        if (1, 1) in counts and {(1, 2), (2, 1)} & counts:
            return budget
    raise AssertionError(f"no budget cuts the steps unevenly; padded lengths {sorted(lengths)}")


def test_a_token_budget_cuts_micro_batches_and_takes_the_same_steps(trained, scored):
    """batch.max_tokens under ZeRO-3 on 2 workers: a rank's share of a step runs as one micro-batch or is cut in
    two where its two prompts together exceed the budget, and a rank that needs one runs two when the other
    rank needs two (ZeRO-3's collectives pair up; the run fails without it). The steps are the row-count
    run's: the same mean gradient, summed over other micro-batches; so are the evaluations."""
    result = trained("zero3_tokens", **{"batch.max_tokens": _budget_with_uneven_steps(Path(scored.folder))})
    counts = [h["micro_batches"] for h in result.history if "micro_batches" in h]  # over both ranks, per step
    assert len(counts) == STEPS and set(counts) == {2, 4}
    assert [h["loss"] for h in result.history] == pytest.approx([h["loss"] for h in trained("zero3").history],
                                                                 abs=1e-5)
    assert _max_abs_diff(_weights(result), _weights(trained("zero3"))) < 1e-5
    # evaluations run under the budget too (forwards paired across ranks the same way), with the same metrics
    evals = lambda run: [h["eval/loss"] for h in run.history if "eval/loss" in h]  # noqa: E731
    assert len(evals(result)) == 2 and evals(result) == pytest.approx(evals(trained("zero3")), abs=1e-5)


def test_each_worker_reads_only_its_share_of_each_epoch(trained):
    """Each of the 2 ranks reads its slice of every global batch from the parquet itself: over the 2 epochs at
    most 1.05 x rows / W a rank per epoch (here exactly rows / W: 32 rows fill 8 global batches of 4)."""
    result = trained("zero3")
    epochs = STEPS // 8
    assert result.metrics["data/rows_read_max"] <= 1.05 * TRAIN_ROWS / 2 * epochs
    assert result.metrics["data/rows_read_max"] == TRAIN_ROWS / 2 * epochs


def test_lora_changes_only_adapters_and_exports_a_loadable_adapter(trained, tiny_model_dir):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = trained("lora")
    assert result.history[-1]["loss"] < result.history[0]["loss"] - 0.1
    assert result.metrics["params/trainable"] < 0.05 * result.metrics["params/total"]
    # the final checkpoint holds every weight: the base ones are bit-identical to the starting model
    final = get_fp32_state_dict_from_zero_checkpoint(result.checkpoint)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    adapters = {k for k in final if ".lora_" in k}
    assert adapters and all(final[k].abs().max() > 0 for k in adapters if "lora_B" in k)  # B starts at 0
    for key, value in final.items():
        if key not in adapters:
            assert torch.equal(value, base[key.removeprefix("lm.").replace(".base_layer", "")]), key

    export = Path(result.export_dir)
    assert (export / "adapter_model.safetensors").is_file() and not (export / "model.safetensors").exists()
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), export).eval()
    merged = AutoModelForCausalLM.from_pretrained(export / "merged").eval()
    prompt = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        assert torch.allclose(policy(prompt).logits, merged(prompt).logits, atol=1e-5)
        generated = policy.generate(prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)


@pytest.mark.slow
def test_resume_after_stop_is_exact(trained):
    """A run stopped after step 12 (the job dies; max_failures=0) and started again with the same run name
    resumes from the step-12 checkpoint, mid-way through epoch 2, and ends with the same parameters as the
    uninterrupted run."""
    import ray.train

    with pytest.raises(ray.train.TrainingFailedError):
        trained("stopped", **{"run.fail_at_step": 12, "run.max_failures": 0})
    resumed = trained("stopped_resumed", **{"run.name": "stopped", "run.fail_at_step": 12})
    reference = trained("zero3")
    assert resumed.history[0]["step"] == 13  # not a fresh start: steps 1-12 came from the checkpoint
    assert _max_abs_diff(_weights(resumed), _weights(reference)) == 0.0
    steps = _steps_from_example_logs(resumed, 2)
    assert steps == _steps_from_example_logs(reference, 2) and sorted(steps) == list(range(1, STEPS + 1))
    for epoch in range(2):  # each epoch sees every training prompt exactly once
        ids = [i for step in range(8 * epoch + 1, 8 * epoch + 9) for i in steps[step]]
        assert sorted(ids) == [f"q{i:03d}" for i in range(TRAIN_ROWS)]


@pytest.mark.slow
def test_worker_failure_restarts_from_last_checkpoint(trained):
    """Rank 0 raises after step 5 (last checkpoint: step 4); FailureConfig restarts the worker group, which
    resumes from step 4, redoes step 5 with the same examples and ends like the uninterrupted run."""
    result = trained("failed_once", **{"run.fail_at_step": 5, "run.max_failures": 1})
    assert result.history[0]["step"] == 5  # the restarted attempt's first step
    assert _max_abs_diff(_weights(result), _weights(trained("zero3"))) == 0.0
    rank0 = [json.loads(line) for line in open(Path(result.run_dir) / "examples" / "rank0.jsonl")]
    assert [line["step"] for line in rank0] == [1, 2, 3, 4, 5, *range(5, STEPS + 1)]
    assert rank0[4]["ids"] == rank0[5]["ids"]  # step 5 redone on the same examples
    assert _steps_from_example_logs(result, 2) == _steps_from_example_logs(trained("zero3"), 2)



# ---- hardening: every failure resumes from the newest complete checkpoint on disk, or stops with a clear message


def _newest_complete(run_dir):
    from mallows_ray.train.checkpoint_files import complete_checkpoints

    found = complete_checkpoints(str(run_dir))
    return found[-1][0] if found else 0


def _record(run_dir, step):
    from mallows_ray.train.checkpoint_files import RECORD, folder_name

    return Path(run_dir) / folder_name(step) / RECORD


def _train_workers():
    """This session's Ray Train worker processes: ray_local started Ray in this process, so they descend from it."""
    workers = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                workers.append(proc)
        except psutil.Error:
            continue
    return workers


@pytest.mark.slow
def test_killed_worker_resumes_from_the_newest_checkpoint_with_default_settings(trained):
    """kill -9 of one of the two training workers just after the step-8 checkpoint is complete, default
    run.max_failures: the worker group restarts from that checkpoint and the run ends exactly as if never hit."""
    reference = trained("zero3")
    run_dir = Path(reference.plan.storage_path) / "killed"
    killed = {}

    def kill_after_step_8(done):
        while not done.is_set() and not _record(run_dir, 8).exists():
            time.sleep(0.05)
        workers = _train_workers()
        if done.is_set() or len(workers) != 2:
            killed["workers_seen"] = len(workers)
            return
        workers[1].send_signal(signal.SIGKILL)
        killed.update(pid=workers[1].pid, newest=_newest_complete(run_dir))

    with in_thread(kill_after_step_8):
        result = trained("killed")
    assert "pid" in killed, killed
    assert killed["newest"] >= 8 and result.history[0]["step"] == killed["newest"] + 1  # not step 1
    assert _max_abs_diff(_weights(result), _weights(reference)) == 0.0
    assert _steps_from_example_logs(result, 2) == _steps_from_example_logs(reference, 2)


def _train_command(items, address):
    return [sys.executable, "-m", "mallows_ray.cli", "train", "--address", address,
            *[f"{key}={value}" for key, value in items.items()]]


@pytest.mark.slow
def test_interrupted_driver_resumes_from_the_checkpoint_just_written(ray_local, trained, scored, tiny_model_dir):
    """SIGINT (Ctrl+C) to a `mallows-ray train` driver 1 s after the step-8 checkpoint is complete; running the
    same command again resumes after step 8 (not from step 1, whatever Ray's own snapshot lists) and ends with
    the uninterrupted run's weights."""
    reference = trained("zero3")
    storage = Path(reference.plan.storage_path)
    items = {**BASE, "model.name_or_path": tiny_model_dir, "data.train": scored.folder, "run.storage_path": storage,
             "run.name": "interrupted"}
    address = ray_local.get_runtime_context().gcs_address  # the session's Ray: one instance on the machine
    driver = subprocess.Popen(_train_command(items, address), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        deadline = time.time() + 600
        while not _record(storage / "interrupted", 8).exists() and driver.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        assert driver.poll() is None, driver.communicate()[0][-3000:]
        driver.send_signal(signal.SIGINT)
        output, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode != 0, output[-3000:]
    newest = _newest_complete(storage / "interrupted")
    assert 8 <= newest < STEPS
    resumed = subprocess.run(_train_command(items, address), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"after step {newest} of {STEPS}" in resumed.stdout + resumed.stderr
    printed = [line for line in resumed.stdout.splitlines() if line.startswith('{"metrics"')]  # workers log too
    export = Path(json.loads(printed[-1])["export"])
    assert _max_abs_diff(load_file(export / "model.safetensors"), _weights(reference)) == 0.0
    rank0 = [json.loads(line) for line in open(storage / "interrupted" / "examples" / "rank0.jsonl")]
    resumed_steps = [line["step"] for line in rank0][-(STEPS - newest):]
    assert resumed_steps == list(range(newest + 1, STEPS + 1))  # the second driver's steps


def _copy_final_checkpoint(result, name):
    """A new run folder holding a copy of `result`'s final checkpoint (and the run marker)."""
    from mallows_ray.drivers.run_dir import MARKER

    source, target = Path(result.run_dir), Path(result.run_dir).parent / name
    target.mkdir()
    shutil.copy(source / MARKER, target / MARKER)
    shutil.copytree(source / f"ckpt_step{STEPS:06d}", target / f"ckpt_step{STEPS:06d}")
    return target / f"ckpt_step{STEPS:06d}"


def test_resume_with_other_worker_count_or_damaged_file_stops_on_the_driver(trained):
    """Checked before any worker starts, so the message is the error itself, not a worker log."""
    from mallows_ray.train.checkpoint_files import CheckpointError

    reference = trained("zero3")
    match = r"was written by 2 workers; resume it with scaling.num_workers=2 \(now 1\)"
    with pytest.raises(CheckpointError, match=match):
        trained("one_worker", **{"run.name": "zero3", "scaling.num_workers": 1, "batch.gradient_accumulation": 2})
    folder = _copy_final_checkpoint(reference, "damaged")
    shard = next(folder.glob("step*/zero_pp_rank_1_*optim_states.pt"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"checkpoint {folder} is damaged: {shard} differs from what was written"):
        trained("damaged")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_planted_pickle_in_a_checkpoint_does_not_run(ray_local, trained, scored, tiny_model_dir, tmp_path):
    """Someone who can write the storage folder replaces a DeepSpeed file (and fixes the record's hashes):
    `mallows-ray train` stops with the file named in its last line, and the code in the file never runs."""
    from mallows_ray.train import checkpoint_files as files

    reference = trained("zero3")
    folder = _copy_final_checkpoint(reference, "planted")
    target = next(folder.glob("step*/zero_pp_rank_0_*model_states.pt"))
    marker = tmp_path / "code_ran"
    torch.save({"module": {}, "payload": _Payload(str(marker))}, target)
    record = json.loads((folder / files.RECORD).read_text())
    record["files"] = files.file_digests(str(folder))
    record["files"].pop(files.RECORD)
    files.write_record(str(folder), {k: v for k, v in record.items() if k != "format"})
    items = {**BASE, "model.name_or_path": tiny_model_dir, "data.train": scored.folder,
             "run.storage_path": reference.plan.storage_path, "run.name": "planted", "run.max_failures": 0}
    out = subprocess.run(_train_command(items, ray_local.get_runtime_context().gcs_address), capture_output=True,
                         text=True, timeout=900)
    ours = [line for line in out.stderr.splitlines() if line.startswith("mallows-ray train:")]  # workers log too
    assert out.returncode == 1 and len(ours) == 1, out.stderr[-3000:]
    assert ours[0].startswith("mallows-ray train: training failed") and \
        f"rank 0: CheckpointError: checkpoint file {target} was not loaded: UnpicklingError: " \
        in ours[0] and "GLOBAL posix.mkdir" in ours[0], ours[0]
    assert not marker.exists()
