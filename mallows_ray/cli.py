"""`mallows-ray`: the command line. Thin: parse arguments, load the config, call the stage."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mallows_ray.config import CACHE_ROOT, load_config
from mallows_ray.typed_config import ConfigError

_EPILOG = """\
Configuration: a YAML file (--config) with sections model, data, loss, then `section.key=value`
overrides, e.g.  mallows-ray prepare --config jobs/configs/local_cpu.yaml data.max_prompt_length=256
Ray: joins $RAY_ADDRESS (as under `ray job submit`) or --address, else starts a local instance, without
Ray's dashboard (its processes slow training on a small machine); MALLOWS_RAY_DASHBOARD=1 starts it.
"""


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config file (defaults are used for absent keys)")
    parser.add_argument("--address", help="Ray address to join (default: $RAY_ADDRESS, else a local instance)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def _add_verbose_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="show Ray's INFO logs, every worker's output and "
                        "library warnings on the console (default: they go to a log file: the demo's "
                        "<out>/console.log, else $MALLOWS_RAY_CACHE/logs/<command>-<run.name>.log)")


def _quiet_console(log_file: Path, verbose: bool, address: str | None) -> None:
    """Stage lines and progress on the console, the rest in `log_file` (mallows_ray/console.py); starts or
    joins Ray between quieting its loggers (before: the start messages) and its worker-output printer
    (after: it exists only then)."""
    from mallows_ray import console
    from mallows_ray.runtime import ensure_ray

    path = console.configure(log_file, verbose=verbose)
    console.quiet_ray_logs()
    ensure_ray(address)
    console.quiet_ray_workers()
    if not verbose:
        print(f"[console] Ray's INFO logs, worker output and warnings: {path} (--verbose shows them here)", flush=True)


def _add_lambda_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lambda", dest="lambdas", action="append", metavar="WEIGHTS",
                        help="preference weights, e.g. helpfulness=0.7,honesty=0.3 (objectives not named are 0) or K "
                        "numbers in the model's objective order; repeatable")
    parser.add_argument("--normalize", action="store_true", help="rescale weights that do not sum to 1")


def _parse_lambdas(texts: list[str] | None, objectives: list[str], normalize: bool) -> dict[str, tuple[float, ...]]:
    """{the text as given: lambda [K]}; errors name the bad entry and the model's objectives."""
    from mallows_ray.lambdas.vectors import parse_lambda_arg

    return {text: parse_lambda_arg(text, objectives, normalize=normalize) for text in texts or []}


def _generate(args: argparse.Namespace) -> int:
    from mallows_ray.drivers.generate import generate, read_prompts
    from mallows_ray.export_format import load_export

    model, tokenizer, conditioning = load_export(args.model)
    objectives = (conditioning or {}).get("objectives", [])
    lambdas = _parse_lambdas(args.lambdas, objectives, args.normalize) or {None: None}
    prompts = args.prompt or read_prompts(args.prompts_file)
    out = args.output.open("w") if args.output else sys.stdout
    for text, lam in lambdas.items():
        responses = generate(model, tokenizer, prompts, lam=lam, conditioning=conditioning,
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             batch_size=args.batch_size, seed=args.seed)
        for prompt, response in zip(prompts, responses):
            out.write(json.dumps({"prompt": prompt, "lambda": text, "response": response}) + "\n")
    if args.output:
        out.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mallows-ray", description="Ray-distributed preference optimisation: DPO family, MallowsPO, "
        "listwise lambda-DPO.", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    prepare = sub.add_parser(
        "prepare", help="validate, tokenize and reference-score preference data into a parquet cache",
        description="Read preference data (jsonl/jsonl.gz/parquet/save_to_disk/HF name), reject bad rows into "
        "rejects.jsonl with reasons, tokenize with the chat template, score every response with the reference "
        "model on a Ray actor pool (log-probs, token entropy -> dispersion s(x)), write parquet + manifest.",
    )
    _add_config_args(prepare)
    _add_verbose_arg(prepare)
    prepare.add_argument("--force", action="store_true", help="rebuild even when the cache is up to date")
    train = sub.add_parser(
        "train", help="train the policy with DeepSpeed on Ray Train workers (prepares the data first if needed)",
        description="Reads the scored dataset (data.train may be a folder printed by `prepare`; raw data is "
        "prepared first), runs scaling.num_workers Ray Train workers with DeepSpeed ZeRO (deepspeed.zero_stage), "
        "optionally LoRA (model.lora), checkpoints every run.checkpoint_every steps under run.storage_path/"
        "run.name, resumes from the latest checkpoint of the same run, and exports an HF folder at the end.",
    )
    _add_config_args(train)
    _add_verbose_arg(train)
    tune = sub.add_parser(
        "tune", help="a Ray Tune sweep over any training-config keys, each trial a full `train` run",
        description="The config is a training config (the base of every trial) plus a `sweep:` section: "
        "name, storage_path, search (grid | random | optuna), num_samples, metric and mode (e.g. eval/loss, "
        "min), scheduler (null, or {name: asha, grace_period, reduction_factor, max_t} in optimizer steps: "
        "weak trials stop early at eval/checkpoint reports) and space: dotted config keys with {grid: [...]}, "
        "{choice: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]} or {randint: [lo, hi]}. The data is "
        "scored once per distinct data config; trials run as many at once as the cluster's CPUs/GPUs hold "
        "(or sweep.max_concurrent_trials). Writes results.csv/.md and best_config.yaml (for `mallows-ray train "
        "--config`) under sweep.storage_path/sweep.name and prints the best checkpoint. Running the same "
        "command again resumes an interrupted sweep without rerunning ended trials. See jobs/configs/sweep_*.yaml.",
    )
    _add_config_args(tune)
    from mallows_ray.demo import run as demo_run

    demo = sub.add_parser(
        "demo", help="the main job on the embedded model and bundled data: prepare -> train -> evaluate -> report",
        description=demo_run.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--out", type=Path, default=Path("mallows_ray_demo"),
                      help="folder for the data subsets, the run (checkpoints, export) and the report "
                      "(default: ./mallows_ray_demo)")
    demo.add_argument("--train-rows", type=int, default=None, help="training prompts (4 replies each; default: "
                      "the whole bundled train split); optim.max_steps=N trains longer")
    demo.add_argument("--test-rows", type=int, default=None,
                      help="test prompts for the evaluation (default: the whole bundled test split)")
    demo.add_argument("--ablations", action="store_true", help="also train without conditioning and without the "
                      "dispersion plug-in (same steps and seed) and report them beside the demo: 3 trainings")
    demo.add_argument("--max-new-tokens", type=int, default=40, help="reply length of the judged generations")
    demo.add_argument("--address", help="Ray address to join (default: $RAY_ADDRESS, else a local instance)")
    demo.add_argument("--fresh", action="store_true", help="replace an earlier demo run in <out>/<run.name> "
                      "(that folder only, and only if mallows-ray made it); without it an earlier run stops the demo")
    _add_verbose_arg(demo)
    demo.add_argument("overrides", nargs="*", metavar="section.key=value",
                      help="overrides of the demo config (mallows_ray/demo/resources/config.yaml)")
    evaluate = sub.add_parser(
        "eval", help="score an exported model on a split of the config's data (listwise: under given lambdas)",
        description="Prepares (or reuses) the config's data, loads the export (full weights or a LoRA adapter) "
        "and prints the loss and reward metrics on --split as JSON. Listwise data: once per lambda (default: "
        "each objective's vertex and the uniform vector, as lambdas.eval_vertices / lambdas.eval_uniform "
        "choose), with lambda rendered into the prompt as in training; "
        "rewards/accuracy is the listwise top-1 accuracy against that lambda's mixed target.",
    )
    _add_config_args(evaluate)
    evaluate.add_argument("--model", required=True, help="export folder written by `mallows-ray train`")
    evaluate.add_argument("--split", default="validation", help="validation (default) or train")
    _add_lambda_args(evaluate)
    generate = sub.add_parser(
        "generate", help="generate from an exported model, lambda-conditioned for listwise-trained models",
        description="Greedy (or sampled with --temperature) responses from an export folder. --lambda renders "
        "the preference weights into the prompt exactly as training did (the export records the objectives); "
        "give it several times to compare lambdas on the same prompts. Writes JSON lines {prompt, lambda, "
        "response} to stdout or --output.",
    )
    generate.add_argument("--model", required=True, help="export folder written by `mallows-ray train`")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a user prompt (repeatable)")
    source.add_argument("--prompts-file", type=Path,
                        help=".jsonl with a `prompt` field per line, or one prompt per line")
    _add_lambda_args(generate)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--batch-size", type=int, default=8)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--output", type=Path, help="JSON lines file (default: stdout)")
    from mallows_ray.bandit import cli as bandit_cli

    bandit_cli.add_arguments(sub.add_parser(
        "bandit", help="the Mallows bandit experiment: DPO vs MallowsPO on the reward-KL trade-off (CPU, seconds)",
        description=bandit_cli.DESCRIPTION,
    ))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bandit":
        from mallows_ray.bandit import cli as bandit_cli

        return bandit_cli.run_cli(args)
    if args.command == "tune":
        from mallows_ray.tune.run import run_cli

        return run_cli(args)
    if args.command == "generate":
        try:
            return _generate(args)
        except ValueError as err:
            print(f"mallows-ray generate: {err}", file=sys.stderr)
            return 2
    try:
        return _run_stage(args)
    except ConfigError as err:
        print(f"mallows-ray {args.command}: configuration error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # the stages' own checks: data, settings, run folders, checkpoints
        print(f"mallows-ray {args.command}: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        import ray.train  # loaded already whenever training ran

        if not isinstance(err, ray.train.WorkerGroupError):  # anything else: a bug, keep its traceback
            raise
        print(f"mallows-ray {args.command}: training failed, run.max_failures restarts used up; "
              f"{_worker_failures(err.worker_failures)} (tracebacks: the worker logs above)", file=sys.stderr)
        return 1


def _worker_failures(failures: dict) -> str:
    """Ray Train's {rank: error} as `rank r: Type: first line` (a worker's error arrives wrapped, with the
    original as `.cause`), so the reason reaches the terminal rather than a truncated remote traceback."""
    parts = []
    for rank, failure in sorted(failures.items()):
        cause = getattr(failure, "cause", None) or failure
        text = str(cause).strip().splitlines()
        parts.append(f"rank {rank}: {type(cause).__name__}: {text[0] if text else ''}")
    return "; ".join(parts)


def _run_stage(args: argparse.Namespace) -> int:
    """prepare, train, eval or demo; their errors of configuration, data and run state are ValueErrors."""
    overrides = list(args.overrides)
    if args.command == "demo":
        from mallows_ray.demo.run import run_demo

        paths = run_demo(overrides, out_dir=args.out, address=args.address, train_rows=args.train_rows,
                         test_rows=args.test_rows, max_new_tokens=args.max_new_tokens, fresh=args.fresh,
                         ablations=args.ablations,
                         on_config=lambda _: _quiet_console(args.out / "console.log", args.verbose, args.address))
        print(json.dumps({name: str(path) for name, path in paths.items()}))
        return 0
    config = load_config(args.config, overrides)
    if args.command in ("prepare", "train"):
        # a local file (run.storage_path may be remote), outside the run folder (which only train creates, marked)
        _quiet_console(CACHE_ROOT / "logs" / f"{args.command}-{config.run.name}.log", args.verbose, args.address)
    if args.command == "eval":
        from mallows_ray.drivers.evaluate import evaluate_export
        from mallows_ray.export_format import read_conditioning

        objectives = (read_conditioning(args.model) or {}).get("objectives", [])
        lambdas = _parse_lambdas(args.lambdas, objectives, args.normalize)
        metrics = evaluate_export(config, args.model, split=args.split, lambdas=lambdas or None, address=args.address)
        print(json.dumps(metrics, indent=2))
        return 0
    if args.command == "train":
        from mallows_ray.drivers.train import run_training

        result = run_training(config, address=args.address)
        print(json.dumps({"metrics": result.metrics, "checkpoint": result.checkpoint, "export": result.export_dir},
                         default=str))
        return 0
    from mallows_ray.data.pipeline import prepare

    prepared = prepare(config, address=args.address, force=args.force)
    print(json.dumps({"scored_data": str(prepared.folder), "dispersion_scale": prepared.manifest["dispersion_scale"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
