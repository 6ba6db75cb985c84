"""`mallows-ray demo`: the main job on the embedded defaults, start to finish on a CPU.

    prepare   the bundled listwise demo data (resources/demo: everyday prompts, 4 SmolLM2 replies each, scored
              by three programmatic judges), reference log-probs + entropy -> s(x)
    train     listwise lambda-DPO with MallowsPO's dispersion plug-in (r = beta s(x) (lp - ref), ALGORITHMS 2.4
              and 3; with two responses and a one-hot target it is MallowsPO-theta), LoRA, lambda rendered into
              the policy's prompt (3.1), 2 Ray Train workers with DeepSpeed ZeRO-2
    evaluate  on the test split, inside the training run (before the first step, midway, after the last):
              reward accuracy (top-1 under the uniform lambda) and pair accuracy (share of the target-ordered
              reply pairs the rewards order the same way) of the untrained and the trained policy; judges' win rates of the trained model's greedy replies against the base
              model's; lambda control: the judges' mean scores of replies generated under each vertex lambda
    report    <out>/report: metrics.json, summary.md, PNG plots, and the exported model under <out>/run

A second run reuses the converted model and the scoring cache. The report shows one whole training run, so
an earlier run folder <out>/<run.name> stops the demo with a message; --fresh replaces it (deleting that one
folder, and only if mallows-ray made it), or give another --out or run.name.
"""

from __future__ import annotations

import gzip
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq

from mallows_ray.config import Config, load_config, to_dict
from mallows_ray.demo_data import demo_path
from mallows_ray.judges import OBJECTIVES, score_all

DEMO_CONFIG = Path(__file__).parent / "resources" / "demo_config.yaml"


def demo_subset(split: str, rows: int, folder: Path) -> Path:
    """The first `rows` records of a bundled demo split as a jsonl file (the splits are already shuffled)."""
    with gzip.open(demo_path(split), "rt") as fh:
        lines = [line for line in fh if line.strip()][:rows]
    path = folder / f"{split}-{len(lines)}.jsonl"
    path.write_text("".join(lines))
    return path


def demo_config(out_dir: Path, overrides: list[str], sizes: dict[str, int]) -> Config:
    """The packaged demo config with the data subsets, the run folder under `out_dir`, and user overrides last.
    The bundled test split is the run's evaluation split: nothing is selected on it (no early stopping, no
    best checkpoint), so the evaluations during training are the held-out figures, step 0 included."""
    data_dir = out_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    return load_config(DEMO_CONFIG, [
        f"data.train={demo_subset('train', sizes['train'], data_dir)}",
        f"data.validation={demo_subset('test', sizes['test'], data_dir)}",
        f"run.storage_path={out_dir}", *overrides,
    ])


def _mean_scores(prompts: list[str], replies: list[str]) -> dict[str, float]:
    scores = [score_all(prompt, reply) for prompt, reply in zip(prompts, replies)]
    return {name: float(np.mean([s[name] for s in scores])) for name in OBJECTIVES}


def win_rates(prompts: list[str], ours: list[str], base: list[str]) -> dict[str, float]:
    """Per judge: the fraction of prompts where our reply scores higher than the base model's (ties: half)."""
    pairs = [(score_all(prompt, a), score_all(prompt, b)) for prompt, a, b in zip(prompts, ours, base)]
    return {name: float(np.mean([1.0 if sa[name] > sb[name] else 0.5 if sa[name] == sb[name] else 0.0
                                 for sa, sb in pairs])) for name in OBJECTIVES}


@contextmanager
def _phase(timings: dict[str, float], name: str, headline: str) -> Iterator[None]:
    """Print `headline`, run the block, record its wall time under `name` and print it."""
    print(f"[demo] {headline}", flush=True)
    started = time.time()
    yield
    timings[name] = time.time() - started
    print(f"[demo] {name} took {timings[name]:.0f} s", flush=True)


def start_fresh(run_folder: Path, fresh: bool) -> None:
    """The demo trains from step 0: an earlier run folder is deleted with `fresh` (if mallows-ray made it,
    `run_dir.delete`), else the demo stops and says how to go on."""
    from mallows_ray.train import run_dir

    if not (run_folder.exists() or run_folder.is_symlink()):
        return
    if not fresh:
        raise run_dir.RunFolderError(
            f"{run_folder} holds an earlier demo run, and the demo reports one whole run: add --fresh to replace "
            "it (only that folder is deleted), or give another --out or run.name=NAME")
    run_dir.delete(run_folder)
    print(f"[demo] --fresh: deleted the earlier run {run_folder}", flush=True)


def run_demo(overrides: list[str], *, out_dir: Path, address: str | None = None, train_rows: int = 128,
             test_rows: int = 16, max_new_tokens: int = 40, fresh: bool = False) -> dict[str, Path]:
    from mallows_ray.generate import generate, load_export
    from mallows_ray.lambdas import format_lambda
    from mallows_ray.report import write_report
    from mallows_ray.train import run_training
    from mallows_ray.train.conditioning import evaluation_lambdas, read_conditioning

    started = time.time()
    out_dir = Path(out_dir).expanduser().resolve()
    config = demo_config(out_dir, overrides, {"train": train_rows, "test": test_rows})
    timings: dict[str, float] = {}

    start_fresh(Path(config.run.storage_path).expanduser() / config.run.name, fresh)  # else it would resume
    with _phase(timings, "prepare_and_train", f"1-3/4 prepare + train ({train_rows} prompts x 4 replies, "
                f"{config.optim.max_steps} steps), evaluated on {test_rows} test prompts before, during and after"):
        result = run_training(config, address=address)
    dispersion = pq.read_table(Path(result.plan.data_folder) / "train", columns=["dispersion"]).column(
        "dispersion").to_numpy()
    export, base = result.export_dir, result.plan.model_path
    evaluations = [h for h in result.history if "eval/loss" in h]
    untrained, trained = evaluations[0], evaluations[-1]  # step 0 (run.eval_at_start) and the last step
    conditioning = read_conditioning(export)
    test_file = Path(config.data.validation)

    with _phase(timings, "generations", "3/4 judged generations on the test prompts: trained vs base model, and "
                "under each vertex lambda"):
        records = [json.loads(line) for line in test_file.read_text().splitlines()]
        prompts = [record["prompt"] for record in records]
        settings = dict(max_new_tokens=max_new_tokens, batch_size=len(prompts))  # one batch: fewest decode steps
        base_replies = generate(*load_export(base)[:2], prompts, **settings)
        model, tokenizer, _ = load_export(export)
        replies = {name: generate(model, tokenizer, prompts, lam=lam, conditioning=conditioning, **settings)
                   for name, lam in evaluation_lambdas(list(OBJECTIVES)).items()}
        control = {format_lambda(lam, OBJECTIVES).split(": ", 1)[1]: _mean_scores(prompts, replies[name])
                   for name, lam in evaluation_lambdas(list(OBJECTIVES)).items()}
        control["base model (no lambda)"] = _mean_scores(prompts, base_replies)
    ours = replies["uniform"]

    print("[demo] 4/4 report")
    eval_metrics = {f"test/{name}{suffix}": evaluation[f"eval/{key}"]
                    for suffix, evaluation in (("", trained), ("_base", untrained))
                    for name, key in (("reward_accuracy", "rewards/accuracy"), ("pair_accuracy", "rewards/pair_accuracy"),
                                      ("loss", "loss"), ("reward_margin", "rewards/margin"))}
    eval_metrics["test/prompts"] = trained["eval/examples"]
    samples = [{"prompt": p, "base": b, "trained": o} for p, b, o in list(zip(prompts, base_replies, ours))[:4]]
    paths = write_report(out_dir / "report", history=result.history, eval_metrics=eval_metrics, dispersion=dispersion,
                         win_rates=win_rates(prompts, ours, base_replies), lambda_control=control,
                         extra={"export": export, "config": to_dict(config), "timings_s": timings,
                                "total_s": time.time() - started, "samples": samples})
    print(f"[demo] done in {time.time() - started:.0f} s: test reward accuracy "
          f"{eval_metrics['test/reward_accuracy']:.3f} (base {eval_metrics['test/reward_accuracy_base']:.3f}), "
          f"pair accuracy {eval_metrics['test/pair_accuracy']:.3f} (base {eval_metrics['test/pair_accuracy_base']:.3f}); "
          f"report {paths['summary']}")
    return paths
