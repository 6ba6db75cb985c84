"""Listwise lambda-conditioned training (ALGORITHMS 3.1-3.2) on a real local Ray instance with a tiny Llama.

Two conflicting objectives: `loud` prefers the shouted answer ("WOW! APPLE IS GREAT!!!"), `calm` the quiet one
("the apple is fine."). A policy that sees lambda in its prompt can rank either answer first on demand; one
that does not see it gives both lambdas the same ranking, so per prompt at most one vertex can be right.
The two vertex prompts differ in one name ("Preference weights: loud=1.00" against "... calm=1.00"); the
tiny model still needs a couple of hundred steps to read it (set when the prompts listed both names and
differed only in where 1.00 stood, not re-tuned since): those runs use one worker and are marked slow.

Separately, on objectives that agree on the best answer, 2 workers with ZeRO-2 and the learned scheduler: the
loss falls, and a run whose worker fails resumes to the identical weights and scheduler state.
"""

import json
from pathlib import Path

import pytest
from preference_data import config_from as _config
from preference_data import write_jsonl as _write_jsonl

WORDS = ["apple", "river", "stone", "cloud", "green", "paper", "light", "music", "bread", "chair"]
OBJECTIVES = ["loud", "calm"]
VERTICES = ["loud=1,calm=0", "loud=0,calm=1"]
CONTRAST_STEPS = 224

COMMON = {
    "data.max_prompt_length": 96, "data.max_response_length": 32, "data.scoring.batch_size": 8,
    "loss.name": "listwise", "optim.warmup_steps": 2, "batch.micro_batch_size": 2,
    "batch.gradient_accumulation": 1, "run.log_every": 4,
}
RUNS = {
    # lambda drawn from the two vertices; shown to the policy or not
    "conditioned": {"lambdas.scheduler": "table", "lambdas.params": json.dumps({"lambdas": VERTICES}),
                    "loss.beta": 1.0, "optim.lr": 1e-3, "optim.schedule": "constant",
                    "optim.max_steps": CONTRAST_STEPS, "scaling.num_workers": 1, "batch.gradient_accumulation": 2,
                    "deepspeed.zero_stage": 0, "run.checkpoint_every": 0},
    "unconditioned": {"lambdas.condition": False, "export.enabled": False},
    # the learned scheduler over the vertices and the uniform vector, 2 workers, ZeRO-2, 2 epochs of 8 steps
    "learned": {"lambdas.scheduler": "learned", "lambdas.update_every": 4, "lambdas.update_prompts": 4,
                "lambdas.params": json.dumps({"candidates": [*VERTICES, "loud=0.5,calm=0.5"], "lr": 4.0,
                                              "exploration": 0.3}),
                "loss.beta": 0.5, "optim.lr": 5e-3, "optim.schedule": "linear", "optim.epochs": 2,
                "scaling.num_workers": 2, "deepspeed.zero_stage": 2, "run.checkpoint_every": 4,
                "run.eval_every": 8, "export.enabled": False},
    "learned_restarted": {"run.fail_at_step": 6, "run.max_failures": 1},
}
BASED_ON = {"unconditioned": "conditioned", "learned_restarted": "learned"}


def _conflicting(count, offset):
    for i in range(offset, offset + count):
        word = WORDS[i % len(WORDS)]
        loud, calm = f"WOW! {word.upper()} IS GREAT!!!", f"the {word} is fine."
        responses, scores = ([loud, calm], {"loud": [4, 0], "calm": [0, 4]}) if i % 2 else \
            ([calm, loud], {"loud": [0, 4], "calm": [4, 0]})
        yield {"id": f"c{i:03d}", "prompt": f"Tell me about the {word} ({i}).", "responses": responses,
               "scores": scores}


def _agreeing(count, offset):
    """`loud` ranks "yes" > "maybe" > "no", `calm` "maybe" > "yes" > "no": they agree on the last answer and,
    mixed by the uniform lambda, on the first; 2 or 3 answers per prompt, in varying positions."""
    for i in range(offset, offset + count):
        word = WORDS[i % len(WORDS)]
        answers = [(f"yes, {word} is fine", 5, 3), (f"maybe {word}", 3, 4), (f"no, {word} is bad", 1, 1)]
        if i % 4 == 0:
            answers.pop(1)
        answers = answers[i % len(answers):] + answers[:i % len(answers)]
        yield {"id": f"a{i:03d}", "prompt": f"Is {word} {i} good?", "responses": [a[0] for a in answers],
               "scores": {"loud": [a[1] for a in answers], "calm": [a[2] for a in answers]}}


@pytest.fixture(scope="module")
def trained(ray_local, tiny_model_dir, tmp_path_factory):
    """`trained(name)`: the TrainResult of RUNS[name] (on top of the run it is BASED_ON), once per module."""
    from mallows_ray.data.pipeline import prepare
    from mallows_ray.drivers.train import run_training

    folder = tmp_path_factory.mktemp("listwise")
    scored = {}

    def data(kind):
        if kind not in scored:
            make = _conflicting if kind == "conflicting" else _agreeing
            items = {"model.name_or_path": tiny_model_dir, "data.cache_dir": folder / "cache",
                     "data.objectives": json.dumps(OBJECTIVES),
                     "data.train": _write_jsonl(folder / f"{kind}-train.jsonl", make(32, 0)),
                     "data.validation": _write_jsonl(folder / f"{kind}-validation.jsonl", make(10, 100)),
                     **{k: v for k, v in COMMON.items() if k.startswith("data.")}}
            scored[kind] = prepare(_config(items))
            assert scored[kind].manifest["objectives"] == OBJECTIVES  # the configured order, not sorted
        return scored[kind].folder

    results = {}

    def settings(name):
        return {**(settings(BASED_ON[name]) if name in BASED_ON else {}), **RUNS[name]}

    def run(name):
        if name not in results:
            kind = "agreeing" if settings(name)["lambdas.scheduler"] == "learned" else "conflicting"
            items = {**COMMON, "model.name_or_path": tiny_model_dir, "data.train": data(kind),
                     "run.storage_path": folder / "runs", "run.name": name,
                     **settings(name)}
            results[name] = run_training(_config(items))
        return results[name]

    return run


def _accuracies(result):
    last = result.history[-1]
    return last["eval/loud/rewards/accuracy"], last["eval/calm/rewards/accuracy"]


@pytest.mark.slow
def test_conditioned_model_follows_each_vertex(trained):
    result = trained("conditioned")
    last = result.history[-1]
    print({k: round(v, 3) for k, v in last.items() if k.startswith("eval/")})
    assert last["step"] == CONTRAST_STEPS and last["eval/examples"] == 10
    # under lambda = (1, 0) the loud answer is ranked first, under (0, 1) the calm one, on held-out prompts
    assert min(_accuracies(result)) >= 0.9
    assert last["eval/loud/loss"] < 0.3 and last["eval/calm/loss"] < 0.3
    # the export records the conditioning that generate/eval reproduce
    settings = json.loads((Path(result.export_dir) / "lambda_conditioning.json").read_text())
    assert settings == {"objectives": OBJECTIVES, "condition": True, "placement": "system"}


@pytest.mark.slow
def test_unconditioned_model_cannot_follow_both_vertices(trained):
    """Without lambda in the prompt the ranking is the same under every lambda: the two vertices' top-1
    accuracies sum to at most 1 per prompt, where the conditioned model's sum to nearly 2."""
    unconditioned = sum(_accuracies(trained("unconditioned")))
    assert unconditioned <= 1.0 + 1e-9
    assert sum(_accuracies(trained("conditioned"))) - unconditioned >= 0.8


@pytest.mark.slow
def test_generate_and_eval_commands_on_the_export(trained, capsys):
    from mallows_ray.cli import main

    result = trained("conditioned")
    capsys.readouterr()  # what training printed (Ray Data's banner) when this test is the first to train it
    export = result.export_dir
    assert main(["generate", "--model", export, "--prompt", "Tell me about the apple.", "--lambda", "loud=1",
                 "--lambda", "calm=1", "--max-new-tokens", "4"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["lambda"] for line in lines] == ["loud=1", "calm=1"]
    assert all(isinstance(line["response"], str) for line in lines)
    assert main(["generate", "--model", export, "--prompt", "x", "--lambda", "shouty=1"]) == 2
    assert "shouty" in capsys.readouterr().err

    config = Path(result.run_dir) / "eval.yaml"
    config.write_text(f"model: {{name_or_path: {result.plan.model_path}}}\n"
                      f"data: {{train: {result.plan.data_folder}}}\nloss: {{name: listwise, beta: 1.0}}\n")
    assert main(["eval", "--config", str(config), "--model", export, "--lambda", "loud=1,calm=0"]) == 0
    metrics = json.loads(capsys.readouterr().out)["loud=1,calm=0"]
    # the same weights, rows and conditioning as the run's final evaluation under the loud vertex
    assert metrics["examples"] == 10
    assert metrics["loss"] == pytest.approx(result.history[-1]["eval/loud/loss"], abs=1e-4)
    # without --lambda: the passes lambdas.eval_vertices / lambdas.eval_uniform choose, as in training's evaluation
    config.write_text(config.read_text() + "lambdas: {eval_uniform: false}\n")
    assert main(["eval", "--config", str(config), "--model", export]) == 0
    assert sorted(json.loads(capsys.readouterr().out)) == ["calm", "loud"]


def test_learned_scheduler_two_workers_zero2(trained):
    result = trained("learned")
    history = result.history
    first, second = history[:2], history[2:]  # log steps 4, 8 | 12, 16
    assert [h["step"] for h in history] == [4, 8, 12, 16]
    assert sum(h["loss"] for h in second) < sum(h["loss"] for h in first)
    assert history[-1]["eval/uniform/rewards/accuracy"] >= 0.8  # "yes" first under the uniform mix
    # the scheduler's probabilities are logged and keep the exploration floor 0.3 / 3; 16 steps teach the
    # unconditional "yes" first, which the loud vertex (candidate 0) scores best, so it gains probability
    probs = [history[-1][f"lambda/p_{j}"] for j in range(3)]
    assert sum(probs) == pytest.approx(1.0) and min(probs) >= 0.1 - 1e-9
    assert probs[0] == max(probs) > 1 / 3 + 1e-3


def test_learned_scheduler_restart_resumes_exactly(trained):
    """Rank 0 raises after step 6 (last checkpoint: step 4, after the scheduler's first update); the restarted
    attempt redoes steps 5-6 with the same lambdas and ends bit-identical, scheduler state included."""
    restarted, reference = trained("learned_restarted"), trained("learned")
    assert restarted.history[0]["step"] == 8  # the restarted attempt's first log step (it resumed at 4)
    a, b = restarted.history[-1], reference.history[-1]
    assert {k: v for k, v in a.items() if k.startswith("lambda/")} == \
        {k: v for k, v in b.items() if k.startswith("lambda/")}
    assert a["loss"] == b["loss"] and a["eval/loss"] == b["eval/loss"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ours = get_fp32_state_dict_from_zero_checkpoint(restarted.checkpoint)
    theirs = get_fp32_state_dict_from_zero_checkpoint(reference.checkpoint)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) == 0.0
