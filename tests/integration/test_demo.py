"""The demo pipeline end to end (prepare -> train -> evaluate -> report) with a tiny model on a small slice of
the bundled demo data, on the session's local Ray instance; checks every report artifact."""

import json

import pytest


@pytest.mark.slow
def test_demo_pipeline_writes_a_complete_report(ray_local, tiny_model_dir, tmp_path):
    from matplotlib.image import imread

    from mallows_ray.demo.judges import OBJECTIVES
    from mallows_ray.demo.run import run_demo

    overrides = [f"model.name_or_path={tiny_model_dir}", f"data.cache_dir={tmp_path / 'cache'}",
                 "optim.max_steps=4", "run.eval_every=2", "run.checkpoint_every=0", "data.scoring.num_actors=1"]
    paths = run_demo(overrides, out_dir=tmp_path / "demo", train_rows=8, test_rows=4, max_new_tokens=4)

    metrics = json.loads(paths["metrics"].read_text())
    assert [row["step"] for row in metrics["train"]] == [2, 4]
    assert [row["step"] for row in metrics["eval_history"]] == [0, 2, 4]  # step 0: run.eval_at_start
    # the demo evaluates under every vertex, not the uniform lambda (lambdas.eval_uniform: false): the unprefixed
    # metrics are the means over the vertices
    last = metrics["eval_history"][-1]
    assert all(f"eval/{name}/rewards/accuracy" in last for name in OBJECTIVES)
    assert not any(key.startswith("eval/uniform/") for key in last)
    for key in ("loss", "rewards/accuracy", "rewards/pair_accuracy"):
        assert last[f"eval/{key}"] == pytest.approx(sum(last[f"eval/{name}/{key}"] for name in OBJECTIVES) / 3)
    evaluation = metrics["eval"]
    assert evaluation["test/prompts"] == 4
    assert evaluation["test/pair_accuracy_base"] == metrics["eval_history"][0]["eval/rewards/pair_accuracy"]
    assert evaluation["test/loss"] == metrics["eval_history"][-1]["eval/loss"]
    for key in ("test/reward_accuracy", "test/reward_accuracy_base", "test/pair_accuracy", "test/pair_accuracy_base"):
        assert 0.0 <= evaluation[key] <= 1.0
    assert set(metrics["win_rates"]) == set(OBJECTIVES)
    assert all(0.0 <= rate <= 1.0 for rate in metrics["win_rates"].values())
    # lambda control: one row per vertex, the uniform lambda and the base model, each scored by every judge
    control = metrics["lambda_control"]
    assert metrics["generation_lambdas"] == [*OBJECTIVES, "uniform", "base model"] == list(control)
    assert all(set(scores) == set(OBJECTIVES) for scores in control.values())
    assert all(cell["lo"] <= cell["mean"] <= cell["hi"] for scores in control.values() for cell in scores.values())
    results = metrics["results"]
    assert list(results) == ["base model", "conditioned policy"]
    trained = results["conditioned policy"]
    assert set(trained["ranking"]) == set(OBJECTIVES) and set(trained["controlled"]) == set(OBJECTIVES)
    assert trained["ranking"]["format"]["top1"] == metrics["eval_history"][-1]["eval/format/rewards/accuracy"]
    assert results["base model"]["ranking"]["format"]["pair"] == metrics["eval_history"][0][
        "eval/format/rewards/pair_accuracy"]
    assert set(trained["control_differences"]["format"]) == set(OBJECTIVES) - {"format"}
    assert metrics["dispersion"]["count"] == 8
    # every judged reply with its scores, one line per test prompt: the matrix's means are their means
    lines = [json.loads(line) for line in paths["generations"].read_text().splitlines()]
    assert [line["run"] for line in lines] == ["conditioned policy"] * 4
    assert all(list(line["replies"]) == list(line["scores"]) == list(control) for line in lines)
    assert control["format"]["positivity"]["mean"] == pytest.approx(
        sum(line["scores"]["format"]["positivity"] for line in lines) / 4)
    summary = paths["summary"].read_text()
    assert "reward_accuracy" in summary and "positivity" in summary
    assert summary.index("## Headline") < summary.index("## Lambda control") < summary.index("### config")
    for name in ("loss", "rewards", "dispersion", "lambda_control"):
        image = imread(paths[name])
        assert image.shape[0] > 100 and image.shape[1] > 100, name
    export = metrics["extra"]["export"]
    assert (tmp_path / "demo" / "demo" / "export" / "adapter_model.safetensors").is_file()
    assert export.endswith("export")


@pytest.mark.slow
def test_demo_ablations_report_every_run(ray_local, tiny_model_dir, tmp_path):
    """--ablations: the same training without conditioning and without dispersion, in the same report."""
    from mallows_ray.demo.run import run_demo

    overrides = [f"model.name_or_path={tiny_model_dir}", f"data.cache_dir={tmp_path / 'cache'}",
                 "optim.max_steps=2", "optim.warmup_steps=1", "run.checkpoint_every=0", "data.scoring.num_actors=1"]
    paths = run_demo(overrides, out_dir=tmp_path / "demo", train_rows=4, test_rows=4, max_new_tokens=3,
                     ablations=True)
    metrics = json.loads(paths["metrics"].read_text())
    results = metrics["results"]
    assert list(results) == ["base model", "conditioned policy", "no conditioning (ablation)",
                             "no dispersion (ablation)"]
    unconditioned = results["no conditioning (ablation)"]
    assert list(unconditioned["lambda_control"]) == ["any lambda (not conditioned)", "base model"]
    assert unconditioned["controlled"] is None and set(unconditioned["ranking"]) == {"conciseness", "format",
                                                                                      "positivity"}
    assert list(results["no dispersion (ablation)"]["lambda_control"])[:3] == ["conciseness", "format", "positivity"]
    for run in ("demo", "demo-no-conditioning", "demo-no-dispersion"):
        assert (tmp_path / "demo" / run / "export" / "adapter_model.safetensors").is_file(), run
    runs = [json.loads(line)["run"] for line in paths["generations"].read_text().splitlines()]
    assert runs == [name for name in list(results)[1:] for _ in range(4)]
    summary = paths["summary"].read_text()
    # the runs are the headline's columns, the base model first
    assert "|  | base model | conditioned policy | no conditioning (ablation) | no dispersion (ablation) |" in summary
    assert "### no dispersion (ablation)" in summary and "no conditioning (ablation) top-1" in summary
