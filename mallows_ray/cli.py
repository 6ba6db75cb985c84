"""`mallows-ray`: the command line. Thin: parse arguments, load the config, call the stage."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mallows_ray.config import ConfigError, load_config

DEMO_DATA = Path(__file__).parent / "resources" / "demo_pairs.jsonl"

_EPILOG = """\
Configuration: a YAML file (--config) with sections model, data, loss, then `section.key=value`
overrides, e.g.  mallows-ray prepare --config jobs/configs/local_cpu.yaml data.max_prompt_length=256
Ray: joins $RAY_ADDRESS (as under `ray job submit`) or --address, else starts a local instance.
"""


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config file (defaults are used for absent keys)")
    parser.add_argument("--address", help="Ray address to join (default: $RAY_ADDRESS, else a local instance)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


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
    prepare.add_argument("--force", action="store_true", help="rebuild even when the cache is up to date")
    train = sub.add_parser(
        "train", help="train the policy with DeepSpeed on Ray Train workers (prepares the data first if needed)",
        description="Reads the scored dataset (data.train may be a folder printed by `prepare`; raw data is "
        "prepared first), runs scaling.num_workers Ray Train workers with DeepSpeed ZeRO (deepspeed.zero_stage), "
        "optionally LoRA (model.lora), checkpoints every run.checkpoint_every steps under run.storage_path/"
        "run.name, resumes from the latest checkpoint of the same run, and exports an HF folder at the end.",
    )
    _add_config_args(train)
    demo = sub.add_parser(
        "demo", help="prepare a small bundled preference set with the embedded SmolLM2-135M-Instruct",
        description="Runs `prepare` on the bundled demo pairs with the embedded model (converted once into "
        "the cache) and prints the scoring summary: reference log-probs, entropy and dispersion s(x).",
    )
    _add_config_args(demo)
    demo.add_argument("--force", action="store_true", help="rebuild even when the cache is up to date")
    from mallows_ray import bandit

    bandit.add_arguments(sub.add_parser(
        "bandit", help="the Mallows bandit experiment: DPO vs MallowsPO on the reward-KL trade-off (CPU, seconds)",
        description=bandit.__doc__.split("\n\n")[0],
    ))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bandit":
        from mallows_ray import bandit

        return bandit.run_cli(args)
    overrides = list(args.overrides)
    if args.command == "demo":
        overrides = [f"data.train={DEMO_DATA}", *overrides]
    try:
        config = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"mallows-ray {args.command}: configuration error: {err}", file=sys.stderr)
        return 2
    if args.command == "train":
        from mallows_ray.train import run_training

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
