"""`mallows-ray demo`: the main job on the embedded defaults, start to finish on a CPU.

    prepare   the bundled listwise demo data (demo/resources/listwise: everyday prompts, 4 SmolLM2 replies
              each, one per style: one short sentence, the requested format, warm ("Great question! ..."),
              plain; scored by three programmatic judges),
              reference log-probs + entropy -> s(x)
    train     listwise lambda-DPO with MallowsPO's dispersion plug-in (r = beta s(x) (lp - ref), ALGORITHMS 2.4
              and 3) plus the likelihood of the replies lambda prefers (listwise_nll) and lambda_contrast
              (which lambda makes each reply likely), LoRA, lambda rendered at the end of the policy's user
              turn (3.1, lambdas.placement), each prompt trained under every vertex lambda in the same step
              (lambdas.vertex_copies), 2 Ray Train workers with DeepSpeed ZeRO-2
    evaluate  on the held-out test split, before the first step (the untrained policy = the base model) and
              after the last: per-vertex top-1 and pair ranking accuracy of the implicit rewards; greedy
              replies generated under each vertex lambda, the uniform one and by the base model, scored by
              every judge: the lambda-control matrix with 90% bootstrap intervals and the paired differences
              that say whether each objective's vertex wins on its own judge
    ablations with --ablations: the same training without conditioning (lambdas.condition=false) and without
              the dispersion plug-in (loss.terms.0.params.dispersion=false), same data, steps and seed, in
              the same report
    report    <out>/report: summary.md (headline table first), metrics.json, PNG plots, generations.jsonl
              (every judged reply with its scores); the exported model under <out>/<run name>/export

A second run reuses the converted model and the scoring cache. The report shows one whole training run, so
an earlier run folder <out>/<run.name> stops the demo with a message; --fresh replaces it (deleting that one
folder, and only if mallows-ray made it), or give another --out or run.name.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mallows_ray.config import Config, load_config
from mallows_ray.console import Progress
from mallows_ray.demo.control import control_differences, control_matrix, controlled
from mallows_ray.demo.data import DEMO_CONFIG, demo_subset, split_size
from mallows_ray.demo.judges import OBJECTIVES, score_all
from mallows_ray.models import resolve_model_path
from mallows_ray.typed_config import to_dict


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


def judge_scores(prompts: list[str], replies: list[str]) -> dict[str, list[float]]:
    """{judge: [score of reply i to prompt i]} for every judge of OBJECTIVES."""
    scores = [score_all(prompt, reply) for prompt, reply in zip(prompts, replies)]
    return {name: [s[name] for s in scores] for name in OBJECTIVES}


def win_rates(prompts: list[str], ours: list[str], base: list[str]) -> dict[str, float]:
    """Per judge: the fraction of prompts where our reply scores higher than the base model's (ties: half)."""
    pairs = [(score_all(prompt, a), score_all(prompt, b)) for prompt, a, b in zip(prompts, ours, base)]
    return {name: float(np.mean([1.0 if sa[name] > sb[name] else 0.5 if sa[name] == sb[name] else 0.0
                                 for sa, sb in pairs])) for name in OBJECTIVES}


def ranking(evaluation: dict[str, float]) -> dict[str, dict[str, float]]:
    """{vertex: {"top1", "pair"}} from one evaluation's per-vertex metrics (lambdas.eval_vertices)."""
    return {name: {"top1": evaluation[f"eval/{name}/rewards/accuracy"],
                   "pair": evaluation[f"eval/{name}/rewards/pair_accuracy"]} for name in OBJECTIVES}


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
    from mallows_ray.drivers import run_dir

    if not (run_folder.exists() or run_folder.is_symlink()):
        return
    if not fresh:
        raise run_dir.RunFolderError(
            f"{run_folder} holds an earlier demo run, and the demo reports one whole run: add --fresh to replace "
            "it (only that folder is deleted), or give another --out or run.name=NAME")
    run_dir.delete(run_folder)
    print(f"[demo] --fresh: deleted the earlier run {run_folder}", flush=True)


BASE = "base model"
UNCONDITIONED = "any lambda (not conditioned)"
# --ablations: the demo's training with one part switched off, same data, steps and seed. Without conditioning
# the lambda_contrast term (loss.terms.2) is switched off too: with lambda hidden it is a constant, log K.
ABLATIONS = {
    "no conditioning": ["lambdas.condition=false", "loss.terms.2.weight=0"],
    "no dispersion": ["loss.terms.0.params.dispersion=false"],
}


def _train(config: Config, address: str | None, fresh: bool):
    from mallows_ray.drivers.train import run_training

    start_fresh(Path(config.run.storage_path).expanduser() / config.run.name, fresh)  # else it would resume
    return run_training(config, address=address)


def _judged_run(config: Config, address: str | None, prompts: list[str], base_scores: dict[str, list[float]],
                settings: dict, timings: dict[str, float], label: str, fresh: bool) -> dict:
    """Train `config`, then generate greedy replies to the test prompts under every generation lambda (each
    vertex and the uniform one; once without lambda when the run does not condition) and judge them."""
    from mallows_ray.drivers.generate import generate
    from mallows_ray.export_format import load_export
    from mallows_ray.train.conditioning import evaluation_lambdas

    with _phase(timings, f"{label}: prepare + train", f"{label}: prepare + train ({config.optim.max_steps} steps, "
                f"evaluated on {len(prompts)} test prompts before and after)"):
        result = _train(config, address, fresh)
    evaluations = [h for h in result.history if "eval/loss" in h]
    untrained, trained = evaluations[0], evaluations[-1]  # step 0 (run.eval_at_start) and the last step
    with _phase(timings, f"{label}: generations", f"{label}: judged generations on the test prompts"):
        model, tokenizer, conditioning = load_export(result.export_dir)
        if conditioning is not None and conditioning.get("condition", True):
            lambdas = evaluation_lambdas(list(OBJECTIVES))
        else:  # the policy never saw a lambda: one set of replies stands for every lambda
            lambdas, conditioning = {UNCONDITIONED: None}, None
        progress = Progress("generate", len(lambdas) * len(prompts), "replies")
        replies = {}
        for name, lam in lambdas.items():
            replies[name] = generate(model, tokenizer, prompts, lam=lam, conditioning=conditioning, **settings)
            progress.update(len(prompts))
    scores = {name: judge_scores(prompts, texts) for name, texts in replies.items()}
    scores[BASE] = base_scores
    differences = control_differences(scores, OBJECTIVES)
    return {"result": result, "untrained": untrained, "trained": trained, "replies": replies, "scores": scores,
            "summary": {"ranking": ranking(trained), "lambda_control": control_matrix(scores),
                        "control_differences": differences, "controlled": controlled(differences) or None}}


def run_demo(overrides: list[str], *, out_dir: Path, address: str | None = None, train_rows: int | None = None,
             test_rows: int | None = None, max_new_tokens: int = 40, ablations: bool = False,
             fresh: bool = False, on_config: Callable[[Config], None] | None = None) -> dict[str, Path]:
    """The demo; `on_config` runs once the config is built and checked, before anything starts Ray (the CLI
    sets up its console there, so a bad setting stops the demo before Ray is up)."""
    from mallows_ray.demo.report import write_report
    from mallows_ray.drivers.generate import generate
    from mallows_ray.export_format import load_export

    started = time.time()
    out_dir = Path(out_dir).expanduser().resolve()
    sizes = {"train": train_rows or split_size("train"), "test": test_rows or split_size("test")}
    config = demo_config(out_dir, overrides, sizes)
    start_fresh(Path(config.run.storage_path).expanduser() / config.run.name, fresh)  # before any work
    if on_config is not None:
        on_config(config)
    timings: dict[str, float] = {}
    records = [json.loads(line) for line in Path(config.data.validation).read_text().splitlines()]
    prompts = [record["prompt"] for record in records]
    settings = dict(max_new_tokens=max_new_tokens, batch_size=len(prompts))  # one batch: fewest decode steps
    print(f"[demo] {sizes['train']} training prompts x 4 replies, {sizes['test']} test prompts; "
          f"{1 + len(ABLATIONS) * ablations} training run(s)", flush=True)

    with _phase(timings, "base model generations", "judged generations of the base model on the test prompts"):
        base_replies = generate(*load_export(resolve_model_path(config.model.name_or_path))[:2], prompts, **settings)
    base_scores = judge_scores(prompts, base_replies)
    main = _judged_run(config, address, prompts, base_scores, settings, timings, "demo", fresh)
    runs = {"demo": main}
    for name, extra_overrides in (ABLATIONS.items() if ablations else ()):
        variant = demo_config(out_dir, [*overrides, *extra_overrides, f"run.name={config.run.name}-"
                                        f"{name.replace(' ', '-')}"], sizes)
        runs[name] = _judged_run(variant, address, prompts, base_scores, settings, timings, name, fresh)

    print("[demo] report", flush=True)
    result, untrained, trained = main["result"], main["untrained"], main["trained"]
    dispersion = result.plan.open_split("train").dispersion()
    eval_metrics = {f"test/{name}{suffix}": evaluation[f"eval/{key}"]
                    for suffix, evaluation in (("", trained), ("_base", untrained))
                    for name, key in (("reward_accuracy", "rewards/accuracy"),
                                      ("pair_accuracy", "rewards/pair_accuracy"), ("loss", "loss"),
                                      ("reward_margin", "rewards/margin"))}
    eval_metrics["test/prompts"] = trained["eval/examples"]
    labelled = {"conditioned policy": main, **{f"{name} (ablation)": run for name, run in runs.items()
                                                if name != "demo"}}  # the report's name for each run
    results = {BASE: {"ranking": ranking(untrained)}, **{label: run["summary"] for label, run in labelled.items()}}
    ours = main["replies"].get("uniform") or main["replies"][UNCONDITIONED]  # lambdas.condition=false: no lambda
    samples = [{"prompt": p, "base": b, **{name: texts[i] for name, texts in main["replies"].items()}}
               for i, (p, b) in enumerate(list(zip(prompts, base_replies))[:4])]
    paths = write_report(out_dir / "report", history=result.history, eval_metrics=eval_metrics, dispersion=dispersion,
                         win_rates=win_rates(prompts, ours, base_replies),
                         lambda_control=main["summary"]["lambda_control"], results=results,
                         generation_lambdas=list(main["summary"]["lambda_control"]),
                         extra={"export": result.export_dir, "total_s": time.time() - started, "timings_s": timings,
                                "config": to_dict(config), "samples": samples})
    paths["generations"] = write_generations(out_dir / "report" / "generations.jsonl", prompts, base_replies,
                                             labelled)
    _print_headline(results, time.time() - started, paths["summary"])
    return paths


def write_generations(path: Path, prompts: list[str], base_replies: list[str], runs: dict[str, dict]) -> Path:
    """Every judged reply, one JSON line per run and test prompt: {"run", "prompt", "replies": {lambda name:
    reply}, "scores": {lambda name: {judge: score}}}, the base model's reply under BASE in each. `runs`:
    {report name: `_judged_run`'s result}, whose scores (BASE's included) the lambda-control means average."""
    with path.open("w") as out:
        for label, run in runs.items():
            replies = {**run["replies"], BASE: base_replies}
            for i, prompt in enumerate(prompts):
                out.write(json.dumps({"run": label, "prompt": prompt,
                                      "replies": {name: texts[i] for name, texts in replies.items()},
                                      "scores": {name: {judge: run["scores"][name][judge][i] for judge in OBJECTIVES}
                                                 for name in replies}}) + "\n")
    return path


def _print_headline(results: dict, seconds: float, summary: Path) -> None:
    """The figures a person looks for first, on the console."""
    print(f"[demo] done in {seconds / 60:.1f} min; report {summary}", flush=True)
    for name, run in results.items():
        top1 = np.mean([v["top1"] for v in run["ranking"].values()])
        pair = np.mean([v["pair"] for v in run["ranking"].values()])
        line = f"[demo]   {name}: top-1 {top1:.3f}, pair {pair:.3f} (mean over vertices)"
        if run.get("controlled"):
            line += (f"; lambda control on {sum(run['controlled'].values())}/{len(run['controlled'])} objectives "
                     f"({', '.join(k for k, ok in run['controlled'].items() if ok) or 'none'})")
        print(line, flush=True)
