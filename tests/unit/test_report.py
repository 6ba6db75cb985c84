"""The report folder from synthetic inputs: every artifact exists and is well-formed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.image import imread

from mallows_ray.demo.report import dispersion_summary, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _history(steps: int = 6, eval_every: int = 3) -> list[dict]:
    """Metric dicts shaped like train/loop.py's: train keys every step, eval/* keys every `eval_every` steps."""
    history = []
    for step in range(1, steps + 1):
        entry = {"step": step, "epoch": 0, "loss": 0.693 - 0.1 * step, "rewards/accuracy": 0.4 + 0.1 * step,
                 "rewards/margin": 0.05 * step, "rewards/chosen": 0.1, "rewards/rejected": -0.1, "lr": 2e-5,
                 "grad_norm": 1.5, "tokens_per_s": 120.0, "samples_per_s": 1.2, "examples": 8.0, "tokens": 900.0}
        if step % eval_every == 0:
            entry.update({"eval/loss": 0.7 - 0.05 * step, "eval/rewards/accuracy": 0.5 + 0.05 * step,
                          "eval/rewards/margin": 0.02 * step, "eval/examples": 24.0})
        history.append(entry)
    return history


def _cell(mean):
    return {"mean": mean, "lo": mean - 0.05, "hi": mean + 0.05}


MATRIX = {
    "conciseness": {"conciseness": _cell(0.8), "format": _cell(0.3)},
    "format": {"conciseness": _cell(0.4), "format": _cell(0.7)},
    "base model": {"conciseness": _cell(0.5), "format": _cell(0.5)},
}
DIFFERENCES = {"conciseness": {"format": _cell(0.4)},
               "format": {"conciseness": {"mean": 0.02, "lo": -0.01, "hi": 0.05}}}


@pytest.fixture
def report(tmp_path):
    rng = np.random.default_rng(0)
    dispersion = rng.normal(1.0, 0.1, size=200)
    dispersion[3] = np.nan  # an unscored prompt must not break the summary or the JSON
    paths = write_report(
        tmp_path / "report",
        history=_history(),
        eval_metrics={"eval/loss": np.float32(0.41), "eval/rewards/accuracy": 0.75, "eval/examples": 24},
        dispersion=dispersion,
        win_rates={"trained vs reference": {"conciseness": 0.6, "format": 0.55, "positivity": 0.7}},
        lambda_control=MATRIX,
        results={
            "base model": {"ranking": {"conciseness": {"top1": 0.25, "pair": 0.5},
                                       "format": {"top1": 0.3, "pair": 0.5}}},
            "trained": {"ranking": {"conciseness": {"top1": 0.75, "pair": 0.8}, "format": {"top1": 0.65, "pair": 0.7}},
                        "lambda_control": MATRIX, "control_differences": DIFFERENCES,
                        "controlled": {"conciseness": True, "format": False}},
        },
        extra={"command": "mallows-ray demo", "loss": "mallows_theta", "seconds": 123.4,
               "config": {"optim": {"lr": 0.002, "max_steps": 16}}},
    )
    return paths, dispersion


def test_every_artifact_is_written(report):
    paths, _ = report
    assert set(paths) == {"metrics", "summary", "loss", "rewards", "dispersion", "lambda_control"}
    assert all(path.is_file() for path in paths.values())


def test_metrics_json(report):
    paths, dispersion = report
    metrics = json.loads(paths["metrics"].read_text())
    assert set(metrics) == {"train", "eval_history", "final_train", "eval", "dispersion", "win_rates",
                            "lambda_control", "generation_lambdas", "results", "extra"}
    assert [h["step"] for h in metrics["train"]] == [1, 2, 3, 4, 5, 6]
    assert [h["step"] for h in metrics["eval_history"]] == [3, 6]
    assert metrics["final_train"]["loss"] == pytest.approx(0.093)
    assert metrics["eval"]["eval/loss"] == pytest.approx(0.41)
    finite = dispersion[np.isfinite(dispersion)]
    assert metrics["dispersion"]["count"] == 199
    assert metrics["dispersion"]["mean"] == pytest.approx(finite.mean())
    assert metrics["dispersion"]["median"] == pytest.approx(np.median(finite))
    assert metrics["lambda_control"]["format"]["format"] == pytest.approx({"mean": 0.7, "lo": 0.65, "hi": 0.75})
    assert metrics["generation_lambdas"] == ["conciseness", "format", "base model"]
    assert metrics["results"]["trained"]["controlled"] == {"conciseness": True, "format": False}
    assert metrics["extra"]["command"] == "mallows-ray demo"


@pytest.mark.parametrize("name", ["loss", "rewards", "dispersion", "lambda_control"])
def test_plots_are_real_pngs(report, name):
    path = report[0][name]
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5_000
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01  # something is drawn, not a blank canvas


def test_summary_mentions_the_key_figures(report):
    paths, dispersion = report
    summary = paths["summary"].read_text()
    for text in ("# Run report", "mallows-ray demo", "| loss | 0.593 | 0.093 |", "0.41", "Win rates",
                 "trained vs reference", "## Lambda control",
                 "| format | 0.400 [0.350, 0.450] | **0.700 [0.650, 0.750]** |",  # the diagonal in bold
                 "| top-1 ranking accuracy, mean over vertices | 0.275 | 0.7 |",
                 "| conciseness judge: conciseness vertex minus the closest other vertex | n/a "
                 "| 0.400 [0.350, 0.450] |",
                 "| objectives under lambda control | n/a | 1/2 |", "| conciseness | 0.25 | 0.5 | 0.75 | 0.8 |",
                 f"{np.nanmean(dispersion):.4g}", "![loss](loss.png)", "![lambda_control](lambda_control.png)"):
        assert text in summary, text
    assert "| 3 | 0.55 | 0.65 | 0.06 |" in summary  # the evaluation at step 3
    assert "| seconds | 123.4 |" in summary
    assert "### config\n\n```yaml\noptim:\n  lr: 0.002\n  max_steps: 16\n```" in summary  # nested: a YAML block
    # the headline opens the report; the run details (config) come last
    assert summary.index("## Headline") < summary.index("## Lambda control") < summary.index("## Training")
    assert summary.index("## Training") < summary.index("## Run") < summary.index("### config")


def test_scheduler_plot_only_when_the_history_logs_probabilities(tmp_path):
    history = [{"step": s, "loss": 1.0, "lambda/p_0": 0.5 + 0.05 * s, "lambda/p_1": 0.5 - 0.05 * s} for s in (1, 2, 3)]
    paths = write_report(tmp_path, history=history, eval_metrics={}, dispersion=[1.0], win_rates=None,
                         lambda_control=None, extra={})
    assert paths["scheduler"].read_bytes()[:8] == PNG_SIGNATURE
    assert "![scheduler](scheduler.png)" in paths["summary"].read_text()


def test_optional_parts_and_empty_inputs(tmp_path):
    paths = write_report(tmp_path, history=[], eval_metrics={}, dispersion=[], win_rates=None,
                         lambda_control=None, extra={})
    assert "lambda_control" not in paths and not (tmp_path / "lambda_control.png").exists()
    assert "scheduler" not in paths
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["dispersion"] == dispersion_summary([]) and metrics["dispersion"]["count"] == 0
    assert metrics["win_rates"] is None and metrics["train"] == []
    assert "No training steps were logged." in paths["summary"].read_text()
    assert paths["loss"].read_bytes()[:8] == PNG_SIGNATURE
