"""A two-term loss (dpo + 0.2 nll, RPO-style) trained with Ray Train on 2 CPU workers (ZeRO-2) and the tiny
Llama: each term's loss is reported in training and evaluation, the total is their weighted sum, both fall,
and `mallows-ray eval` (evaluate_export) builds the same composite loss from the config. The same with WPO
weighting on the dpo term: the policy forward then also returns the aligned log-probs, through DeepSpeed; and
with LD-DPO's ld_alpha on it: the forward also returns the shared-length sums, the data has ref_shared_logps."""

import math

import pytest
from preference_data import config_from as _config
from preference_data import write_jsonl as _write_jsonl
from preference_data import yes_no_pairs as _pairs

from mallows_ray.data.pipeline import prepare

NLL_WEIGHT = 0.2
ITEMS = {
    "data.max_prompt_length": 48, "data.max_response_length": 24, "data.scoring.batch_size": 8,
    "loss.terms": f"[{{name: dpo, params: {{beta: 0.1}}}}, {{name: nll, weight: {NLL_WEIGHT}}}]",
    "optim.lr": 5e-3, "optim.schedule": "linear", "optim.warmup_steps": 2, "optim.epochs": 1,
    "batch.micro_batch_size": 2, "scaling.num_workers": 2, "deepspeed.zero_stage": 2,
    "run.eval_every": 4, "run.log_every": 1,
}
RUNS = {"dpo-nll": {},
        "wpo": {"loss.terms": f"[{{name: dpo, params: {{beta: 0.1, wpo: true}}}}, "
                              f"{{name: nll, weight: {NLL_WEIGHT}}}]"},
        "ld": {"loss.terms": f"[{{name: dpo, params: {{beta: 0.1, ld_alpha: 0.5}}}}, "
                             f"{{name: nll, weight: {NLL_WEIGHT}}}]"}}


@pytest.fixture(scope="module")
def trained(ray_local, tiny_model_dir, tmp_path_factory):
    """`trained(name)`: (config, TrainResult) of RUNS[name], trained once per module on data prepared once."""
    from mallows_ray.drivers.train import run_training

    folder = tmp_path_factory.mktemp("composite")
    data = {"model.name_or_path": tiny_model_dir, "data.cache_dir": folder / "cache",
            "data.train": _write_jsonl(folder / "train.jsonl", _pairs(32, 0)),
            "data.validation": _write_jsonl(folder / "validation.jsonl", _pairs(7, 100)),
            **{k: v for k, v in ITEMS.items() if k.startswith("data.")}}
    scored = prepare(_config(data))
    results = {}

    def run(name):
        if name not in results:
            config = _config({**ITEMS, **RUNS[name], "model.name_or_path": tiny_model_dir, "run.name": name,
                              "data.train": scored.folder, "run.storage_path": folder / "runs"})
            results[name] = config, run_training(config)
        return results[name]

    return run


def test_two_term_loss_reports_each_term_and_falls(trained):
    config, result = trained("dpo-nll")
    history = result.history
    assert [h["step"] for h in history] == list(range(1, 9))  # 32 prompts in global batches of 4
    for h in history:  # the reported total is the weighted sum of the reported terms, every step
        assert h["loss"] == pytest.approx(h["loss/dpo"] + NLL_WEIGHT * h["loss/nll"], abs=1e-5)
    first, last = history[0], history[-1]
    assert first["loss/dpo"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert first["loss/nll"] > 1.0  # a random tiny model: mean token NLL of the chosen replies, nats
    assert last["loss"] < first["loss"] - 0.3, [h["loss"] for h in history]
    assert last["loss/dpo"] < first["loss/dpo"] and last["loss/nll"] < first["loss/nll"] - 0.5
    assert last["eval/loss"] == pytest.approx(last["eval/loss/dpo"] + NLL_WEIGHT * last["eval/loss/nll"], abs=1e-5)
    assert last["eval/rewards/accuracy"] > 0.5


@pytest.mark.parametrize("name", list(RUNS))
def test_eval_of_the_export_builds_the_same_composite(trained, name):
    from mallows_ray.drivers.evaluate import evaluate_export

    config, result = trained(name)
    metrics = evaluate_export(config, result.export_dir, split="validation")["pairwise"]
    last = result.history[-1]
    for key in ("loss", "loss/dpo", "loss/nll", "rewards/accuracy"):
        assert metrics[key] == pytest.approx(last[f"eval/{key}"], abs=1e-4), key


def test_wpo_weighted_term_trains(trained):
    _, plain = trained("dpo-nll")
    _, result = trained("wpo")
    first, last = result.history[0], result.history[-1]
    # same data, same first batch, policy == reference: dpo's log 2 per pair, times each pair's WPO weight
    # exp(a(y_w) + a(y_l)) != 1; the nll term is unweighted and identical
    assert first["loss/nll"] == pytest.approx(plain.history[0]["loss/nll"], abs=1e-5)
    assert abs(first["loss/dpo"] - math.log(2)) > 1e-3 and 0 < first["loss/dpo"] < 10
    assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-6)  # rewards are not weighted
    assert last["loss"] < first["loss"] - 0.3 and last["loss/nll"] < first["loss/nll"] - 0.5


def test_ld_alpha_term_trains(trained):
    _, result = trained("ld")
    first, last = result.history[0], result.history[-1]
    # policy == reference at step 1: the policy's shared-length sums (training forward, through DeepSpeed) equal
    # the prepared ref_shared_logps column, so every LD-weighted log-ratio is 0 and dpo's loss is log 2
    assert first["loss/dpo"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    assert last["loss"] < first["loss"] - 0.3 and last["eval/rewards/accuracy"] > 0.5
