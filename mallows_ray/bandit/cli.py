"""`mallows-ray bandit` (or `python -m mallows_ray.bandit.cli --out DIR`): the method x beta grid, in-process or
as a Ray Tune sweep, written as CSV, markdown, JSON and a PNG plot."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from mallows_ray import bandit
from mallows_ray.bandit.config import METHODS, BanditConfig, load_bandit_config
from mallows_ray.bandit.problem import build_problem, problem_frontier
from mallows_ray.bandit.summary import describe_problem, format_table, summarize, summary_text, write_outputs
from mallows_ray.bandit.sweep import bandit_sweep
from mallows_ray.bandit.training import run_experiment
from mallows_ray.typed_config import ConfigError

DESCRIPTION = bandit.__doc__.split("\n\n")[0]


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]  # checked with the rest by load_bandit_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bandit options, so `mallows-ray bandit` can reuse them on a subparser; defaults from BanditConfig."""
    d = BanditConfig()
    parser.add_argument("--out", type=Path, default=Path("bandit_out"), help="output folder (default: bandit_out)")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"training steps per trial ({d.steps})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"learning rate ({d.lr})")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default=d.optimizer)
    parser.add_argument("--betas", type=_floats, default=d.betas,
                        help="comma-separated beta grid (default: " + ",".join(f"{b:g}" for b in d.betas) + ")")
    parser.add_argument("--methods", type=_names, default=d.methods,
                        help=f"comma-separated, from {','.join(METHODS)} (default: {','.join(d.methods)})")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--pairs-per-context", type=int, default=d.pairs_per_context,
                        help=f"sampled rankings (one pair each) per context ({d.pairs_per_context})")
    parser.add_argument("--population", action="store_true",
                        help="use exact pair probabilities (infinite data) instead of samples")
    parser.add_argument("--phis", type=_floats, default=d.phis, help="comma-separated dispersion per context")
    parser.add_argument("--arms", type=int, default=d.num_arms)
    parser.add_argument("--rewards", choices=("linear", "random"), default=d.rewards)
    parser.add_argument("--noise-sigma", type=float, default=d.noise_sigma,
                        help="log-normal noise of the *_noisy methods' s(x)")
    parser.add_argument("--tune", action="store_true",
                        help="run the method x beta grid as a Ray Tune sweep (one trial each) instead of in-process")
    parser.add_argument("--address", help="Ray address for --tune (default: $RAY_ADDRESS, else a local instance)")


def run_cli(args: argparse.Namespace) -> int:
    try:
        cfg = load_bandit_config({
            "steps": args.steps, "lr": args.lr, "optimizer": args.optimizer, "betas": args.betas,
            "methods": args.methods, "seed": args.seed, "pairs_per_context": args.pairs_per_context,
            "population": args.population, "phis": args.phis, "num_arms": args.arms, "rewards": args.rewards,
            "noise_sigma": args.noise_sigma,
        })
    except ConfigError as err:
        print(f"mallows-ray bandit: configuration error: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    problem = build_problem(cfg)
    curve = problem_frontier(problem, cfg)
    if args.tune:
        rows = bandit_sweep(cfg, Path(args.out) / "tune", address=args.address)
    else:
        rows = run_experiment(cfg, problem)
    notes = describe_problem(problem, cfg)
    paths = write_outputs(rows, curve, args.out, notes=notes)
    print(notes + "\n")
    print(format_table(rows) + "\n")
    print(summary_text(summarize(rows, curve)) + "\n")
    if "png" not in paths:
        print("note: matplotlib is missing, no plot written")
    written = ", ".join(str(p) for p in paths.values())
    print(f"{len(rows)} trials in {time.perf_counter() - start:.1f} s; wrote {written}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mallows_ray.bandit.cli", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # [C, A] tensors: threads only cost overhead on a shared machine
    return run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
