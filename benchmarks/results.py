"""Held-out results on real preference data: mallows_ray's losses beside TRL's DPOTrainer, one command.

    python benchmarks/results.py                       # 256 train + 200 held-out HH pairs (about an hour on 2 cores)
    python benchmarks/results.py --train-pairs 16 --heldout-pairs 16    # a harness check, not a result

1. Pairs: the HH-RLHF harmless-base test pairs that fit --max-prompt-length / --max-response-length without
   truncation (so both frameworks see the same tokens), in file order: the first --train-pairs train, the next
   --heldout-pairs are held out; neither framework trains on them.
2. `mallows-ray prepare` of the train pairs (mallows_ray's reference pass, timed) and of the held-out pairs as a
   dataset of their own (so no training run can read them).
3. `mallows-ray train` per method (DPO, MallowsPO-theta, SimPO and IPO with and without the dispersion plug-in)
   and `python -m benchmarks.trl_train` (TRL's `DPOTrainer`, default mode): the same pairs, beta, lr, linear
   schedule, global batch, one epoch, lengths, fp32 and grad-norm clipping; each its own process, timed.
4. `mallows-ray eval` on the held-out split for every saved HF folder, TRL's included, and the untrained model:
   the DPO implicit reward beta * (lp(y) - ref(y)) whatever the training loss, so every row is comparable.
5. The table replaces the held-out section of benchmarks/RESULTS.md (the speed rows of `run.py` stay), rewritten
   after every evaluated model: a partial table says so.

Every step runs in its own process; its command line and log (benchmarks/logs/heldout/<name>.log) are kept, and
a finished step leaves a record in the work folder, so the same command after an interruption continues where
it stopped (TRL's run, which needs no Ray, goes first); `--lock FILE` holds an flock on
FILE around each step that starts Ray, for a machine where other Ray jobs must not overlap (one Ray instance per
machine while training).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # `python benchmarks/results.py` from anywhere: make `benchmarks` importable

from benchmarks.common import REPO, Workload, model_path, trl_rows, untruncated_pairs, write_raw_pairs  # noqa: E402
from benchmarks.sections import replace_section  # noqa: E402

SECTION = "heldout"
LOAD_SAMPLE_S = 10  # seconds between load-average samples while a step runs


@dataclass(frozen=True)
class Method:
    name: str          # run name and table key
    label: str         # what the table calls it
    overrides: tuple[str, ...]


def methods(beta: float, simpo_beta: float, simpo_gamma: float, mallows_simpo_c: float) -> list[Method]:
    """DPO first (the parity row), then the MallowsPO rows and their plain counterparts."""
    simpo = ("loss.name=simpo", f"loss.beta={simpo_beta}", f"loss.gamma={simpo_gamma}")
    return [
        Method("dpo", f"DPO (beta {beta})", ("loss.name=dpo", f"loss.beta={beta}")),
        Method("mallows_theta", f"MallowsPO-theta (beta {beta}, c auto)",
               ("loss.name=mallows_theta", f"loss.beta={beta}")),
        Method("simpo", f"SimPO (beta {simpo_beta}, gamma {simpo_gamma})", simpo),
        Method("mallows_simpo", f"Mallows-SimPO (SimPO + dispersion, c {mallows_simpo_c})",
               (*simpo, "loss.dispersion=true", f"data.dispersion_scale={mallows_simpo_c}")),
        Method("ipo", f"IPO (beta {beta})", ("loss.name=ipo", f"loss.beta={beta}")),
        Method("mallows_ipo", f"IPO + dispersion (beta {beta}, c auto)",
               ("loss.name=ipo", f"loss.beta={beta}", "loss.dispersion=true")),
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-pairs", type=int, default=256)
    parser.add_argument("--heldout-pairs", type=int, default=200)
    parser.add_argument("--max-prompt-length", type=int, default=128)
    parser.add_argument("--max-response-length", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.1, help="DPO / MallowsPO / IPO beta, and the eval reward's")
    parser.add_argument("--simpo-beta", type=float, default=10.0, help="the MallowsPO authors' Mallows-SimPO beta")
    parser.add_argument("--simpo-gamma", type=float, default=5.0, help="SimPO margin (gamma / beta = 0.5)")
    parser.add_argument("--mallows-simpo-c", type=float, default=0.29, help="the authors' fixed dispersion scale c")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--micro-batch", type=int, default=4, help="pairs per forward")
    parser.add_argument("--gradient-accumulation", type=int, default=2, help="global batch = micro x accumulation")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each training process")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only these methods (dpo, trl_dpo, mallows_theta, ...); the table shows what ran")
    parser.add_argument("--work", type=Path, help="folder for data, cache, runs and finished-step records (default: "
                        "one per settings under $MALLOWS_RAY_CACHE/heldout-results; a rerun continues there)")
    parser.add_argument("--lock", type=Path, help="flock this file around every step that starts Ray")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--logs", type=Path, default=HERE / "logs" / "heldout")
    return parser.parse_args()


def last_json(text: str):
    """The last JSON value that starts at the beginning of a line of `text` (the CLI's result)."""
    decoder = json.JSONDecoder()
    starts = [i for i in range(len(text)) if text[i] == "{" and (i == 0 or text[i - 1] == "\n")]
    for start in reversed(starts):
        try:
            return decoder.raw_decode(text[start:])[0]
        except json.JSONDecodeError:
            continue
    raise ValueError("no JSON result in the output")


class Runner:
    """Runs each step as its own process, logs it, times it and parses its JSON result.

    A finished step leaves `<work>/steps/<name>.json` (command, result, seconds, the load at its end and the
    mean load while it ran); running the same command again skips it, so an interrupted run continues where it
    stopped."""

    def __init__(self, work: Path, logs: Path, lock: Path | None, threads: int):
        self.steps, self.logs, self.lock = work / "steps", logs, lock
        self.commands: dict[str, str] = {}
        self.loads: dict[str, float] = {}    # step -> mean load while it ran (older records: the load at its end)
        self.seconds: dict[str, float] = {}  # step -> wall seconds
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
                    "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
        self.steps.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)

    def done(self, name: str) -> bool:
        return (self.steps / f"{name}.json").exists()

    def __call__(self, name: str, command: list[str], uses_ray: bool = True) -> tuple[dict, float]:
        self.commands[name] = " ".join(shlex.quote(part) for part in command)
        record = self.steps / f"{name}.json"
        if record.exists():
            step = json.loads(record.read_text())
            print(f"[results] {name}: done earlier ({step['seconds']:.0f} s), {record}", flush=True)
            self.loads[name] = step.get("load_mean", step["load_after"])
            self.seconds[name] = step["seconds"]
            return step["result"], step["seconds"]
        print(f"[results] {name}: {self.commands[name]}", flush=True)
        log = self.logs / f"{name}.log"
        with self._locked(uses_ray):  # the wait for the lock is not part of the step's time
            start = time.perf_counter()
            stdout, stderr, returncode, load_mean = self._run_sampling_load(command)
            seconds = time.perf_counter() - start
        log.write_text(stdout + "\n--- stderr ---\n" + stderr)
        if returncode != 0:
            raise SystemExit(f"[results] {name} failed (exit {returncode}); see {log}")
        load = os.getloadavg()[0]
        print(f"[results] {name}: {seconds:.0f} s (mean load {load_mean:.1f})", flush=True)
        result = last_json(stdout)
        record.write_text(json.dumps({"command": self.commands[name], "result": result, "seconds": seconds,
                                      "load_after": load, "load_mean": load_mean}))
        self.loads[name], self.seconds[name] = load_mean, seconds
        return result, seconds

    def _run_sampling_load(self, command: list[str]) -> tuple[str, str, int, float]:
        """Run `command`; also the mean of the 1-minute load average sampled every LOAD_SAMPLE_S while it runs
        (the other work on the cores during the step, its own threads included: 2 = a 2-thread step alone)."""
        samples = []
        with subprocess.Popen(command, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) as proc:
            while True:
                try:
                    stdout, stderr = proc.communicate(timeout=LOAD_SAMPLE_S)
                    break
                except subprocess.TimeoutExpired:
                    samples.append(os.getloadavg()[0])
        samples = samples or [os.getloadavg()[0]]
        return stdout, stderr, proc.returncode, sum(samples) / len(samples)

    @contextmanager
    def _locked(self, uses_ray: bool) -> Iterator[None]:
        if not (uses_ray and self.lock):
            yield
            return
        with self.lock.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def data_overrides(args: argparse.Namespace, work: Path, pairs_file: str) -> list[str]:
    """The data settings of a scored dataset of `pairs_file`: the train pairs for training, the held-out pairs
    (as their own dataset's train split) for evaluation, so no training run ever reads a held-out pair."""
    return [
        f"data.train={work / pairs_file}", "data.format=hh", f"data.cache_dir={work / 'cache'}",
        f"data.max_prompt_length={args.max_prompt_length}", f"data.max_response_length={args.max_response_length}",
        "data.scoring.num_actors=1", "model.dtype=float32",
    ]


def train_overrides(args: argparse.Namespace, work: Path, name: str) -> list[str]:
    """The side-by-side settings; TRL's flags in `trl_command` mirror them."""
    return [
        "optim.epochs=1", f"optim.lr={args.lr}", "optim.schedule=linear", "optim.warmup_steps=0",
        "optim.max_grad_norm=1.0", f"batch.micro_batch_size={args.micro_batch}",
        f"batch.gradient_accumulation={args.gradient_accumulation}", "deepspeed.zero_stage=0",
        # one worker with every core's threads (OMP_NUM_THREADS) and 1 Ray CPU, as the TRL process has the machine
        "scaling.num_workers=1", "scaling.cpus_per_worker=1", f"run.storage_path={work / 'runs'}",
        f"run.name={name}", "run.log_every=1000000", "run.checkpoint_every=0", "export.enabled=true",
    ]


def trl_command(args: argparse.Namespace, work: Path) -> list[str]:
    return [sys.executable, "-m", "benchmarks.trl_train", f"--pairs={work / 'train_trl.jsonl'}",
            f"--output={work / 'runs' / 'trl_dpo' / 'export'}", f"--beta={args.beta}", f"--lr={args.lr}",
            "--warmup-steps=0", f"--micro-batch={args.micro_batch}",
            f"--gradient-accumulation={args.gradient_accumulation}",
            f"--max-length={args.max_prompt_length + args.max_response_length}", "--max-grad-norm=1.0",
            f"--threads={args.threads}"]


def standard_error(p: float, n: int) -> float:
    """Binomial standard error of a share p over n pairs."""
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def base_preferences(scored_folder: Path) -> dict[str, float]:
    """The untrained model's own log-prob preference on the held-out pairs, from the reference columns of the
    scored split (the reference is the base model): share with ref(y_w) > ref(y_l), summed and per token."""
    import pyarrow.parquet as pq

    table = pq.read_table(scored_folder / "train", columns=["ref_logps", "ref_token_counts"])
    logps, counts = table.column("ref_logps").to_pylist(), table.column("ref_token_counts").to_pylist()
    summed = sum(lp[0] > lp[1] for lp in logps) / len(logps)
    per_token = sum(lp[0] / n[0] > lp[1] / n[1] for lp, n in zip(logps, counts)) / len(logps)
    return {"pairs": len(logps), "sum": summed, "per_token": per_token}


def parity_line(ours: dict, trl: dict, n: int, prepare_seconds: float) -> str:
    """The headline: mallows_ray's held-out DPO accuracy against TRL's, in TRL's standard errors, and the times."""
    acc, trl_acc = ours["metrics"]["rewards/accuracy"], trl["metrics"]["rewards/accuracy"]
    se, trl_se = standard_error(acc, n), standard_error(trl_acc, n)
    gap = abs(acc - trl_acc) / max(trl_se, 1e-12)
    total = ours["seconds"] + prepare_seconds
    return (f"**DPO parity**: held-out accuracy on {n} pairs, mallows_ray {acc:.3f} +- {se:.3f} vs TRL "
            f"{trl_acc:.3f} +- {trl_se:.3f}: {gap:.1f} of TRL's standard errors apart "
            f"({'within' if gap <= 2 else 'NOT within'} 2); time mallows_ray {ours['seconds']:.0f} s train "
            f"(load {ours['load']:.1f}) + {prepare_seconds:.0f} s prepare = {total:.0f} s vs TRL "
            f"{trl['seconds']:.0f} s (load {trl['load']:.1f}) ({total / trl['seconds']:.2f}x; times under different "
            "loads are not a speed comparison: benchmarks/RESULTS.md's speed rows are).")


def render(rows: list[dict], base: dict, facts: dict) -> str:
    n = base["pairs"]
    lines = [
        f"## Held-out results on HH-RLHF (`{facts['invocation']}`)",
        "",
        *([f"**Partial: {len(rows)} of the {facts['expected_rows']} rows so far**; the same command continues "
           "where it stopped.", ""] if len(rows) < facts["expected_rows"] else []),
        f"The steps took {facts['step_minutes']:.1f} min in all (the last invocation ran {facts['minutes']:.1f} "
        f"min, load average before {facts['load_before']}, after {facts['load_after']}; each step's time and load "
        "are in its record in the work folder). "
        f"{facts['train_pairs']} train pairs, {n} held-out pairs (HH harmless-base test "
        f"pairs within {facts['lengths']} tokens, untruncated), SmolLM2-135M-Instruct (embedded), full fine-tuning, "
        f"fp32 CPU, {facts['threads']} threads, one epoch, lr {facts['lr']} linear to 0, no warm-up, global batch "
        f"{facts['global_batch']} ({facts['micro_batch']} x {facts['accumulation']}), grad-norm clip 1.0, the "
        "same for every row. Held-out accuracy: share of pairs whose DPO implicit reward beta (lp(y) - ref(y)) "
        f"(beta {facts['beta']}) is higher for the chosen reply, +- its binomial standard error; margin: mean "
        "reward difference; log-ratio: mean lp(y_w) - ref(y_w) of the chosen replies (a KL proxy). Every row is "
        "`mallows-ray eval` of a saved HF folder on the held-out pairs (scored as a dataset of their own, which no "
        "training run reads). Train time: the process's wall time (mallows_ray: Ray start, reading the scored "
        "cache, training, export; TRL: model load, tokenization, training with a reference forward in every step, "
        "save), with the mean load average while it ran (2 = the 2-thread step alone on the 2 cores; records "
        "written before the load was sampled give the load at the step's end). mallows_ray's reference pass, "
        f"`mallows-ray prepare` of the train pairs, took "
        f"{facts['prepare_seconds']:.0f} s, once for every c = auto row (the Mallows-SimPO row's fixed c is "
        "another scored dataset: its train time includes its own prepare).",
        "",
        "| method | trained by | held-out accuracy | margin | log-ratio (chosen) | train time (load) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        m = row["metrics"]
        time_text = f"{row['seconds']:.0f} s ({row['load']:.1f})" if row.get("seconds") is not None else "-"
        accuracy = f"{m['rewards/accuracy']:.3f} +- {standard_error(m['rewards/accuracy'], n):.3f}"
        if row["name"] == "untrained":  # rewards are 0 up to rounding: strict > counts rounding noise
            accuracy = f"0.5 by construction (measured {m['rewards/accuracy']:.3f}: float rounding of 0)"
        lines.append(f"| {row['label']} | {row['by']} | {accuracy} | {m['rewards/margin']:+.4f} | "
                     f"{m['rewards/chosen'] / facts['beta']:+.3f} | {time_text} |")
    lines += ["", f"Base model's own log-prob preference on the held-out pairs (share with lp(y_w) > lp(y_l)): "
              f"{base['sum']:.3f} +- {standard_error(base['sum'], n):.3f} summed, {base['per_token']:.3f} +- "
              f"{standard_error(base['per_token'], n):.3f} per token (the untrained model's implicit rewards are 0: "
              "policy = reference).", ""]
    by_name = {row["name"]: row for row in rows}
    if "dpo" in by_name and "trl_dpo" in by_name:
        lines += [parity_line(by_name["dpo"], by_name["trl_dpo"], n, facts["prepare_seconds"]), ""]
    lines += ["Commands (logs in benchmarks/logs/heldout/):", "", "```", *facts["commands"], "```"]
    return "\n".join(lines)


def work_folder(args: argparse.Namespace) -> Path:
    """Default --work: one folder per set of result-changing settings, so a rerun continues the same results."""
    from mallows_ray.config import CACHE_ROOT

    keys = ("train_pairs", "heldout_pairs", "max_prompt_length", "max_response_length", "beta", "simpo_beta",
            "simpo_gamma", "mallows_simpo_c", "lr", "micro_batch", "gradient_accumulation", "threads")
    digest = hashlib.sha256(json.dumps({k: getattr(args, k) for k in keys}).encode()).hexdigest()[:12]
    return args.work or CACHE_ROOT / "heldout-results" / digest


def main() -> None:
    args = parse_args()
    started, load_before = time.perf_counter(), " ".join(f"{x:.2f}" for x in os.getloadavg())
    from mallows_ray.models import load_tokenizer

    workload = Workload(max_prompt_length=args.max_prompt_length, max_response_length=args.max_response_length)
    pairs = untruncated_pairs(load_tokenizer(model_path()), workload, n=args.train_pairs + args.heldout_pairs)
    train, heldout = pairs[:args.train_pairs], pairs[args.train_pairs:]
    work = work_folder(args)
    work.mkdir(parents=True, exist_ok=True)
    print(f"[results] work folder {work} (finished steps there are reused)", flush=True)
    write_raw_pairs(train, work / "train.jsonl")
    write_raw_pairs(heldout, work / "heldout.jsonl")
    (work / "train_trl.jsonl").write_text("".join(json.dumps(row) + "\n" for row in trl_rows(train)))
    run = Runner(work, args.logs, args.lock, args.threads)
    cli = [sys.executable, "-m", "mallows_ray.cli"]
    wanted = [m for m in methods(args.beta, args.simpo_beta, args.simpo_gamma, args.mallows_simpo_c)
              if not args.only or m.name in args.only]
    with_trl = not args.only or "trl_dpo" in args.only
    if with_trl:  # first: it needs no Ray, so it never waits for the lock
        run("train_trl_dpo", trl_command(args, work), uses_ray=False)
    data = data_overrides(args, work, "train.jsonl")
    _, prepare_seconds = run("prepare_train", [*cli, "prepare", *data])
    heldout_data = data_overrides(args, work, "heldout.jsonl")
    prepared, _ = run("prepare_heldout", [*cli, "prepare", *heldout_data])
    base = base_preferences(Path(prepared["scored_data"]))
    evaluate = [*cli, "eval", *heldout_data, "loss.name=dpo", f"loss.beta={args.beta}",
                f"batch.micro_batch_size={args.micro_batch}", "--split=train"]
    facts = {
        "invocation": "python benchmarks/results.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "load_before": load_before, "train_pairs": len(train),
        "lengths": f"{args.max_prompt_length}/{args.max_response_length}", "threads": args.threads, "lr": args.lr,
        "global_batch": args.micro_batch * args.gradient_accumulation, "micro_batch": args.micro_batch,
        "accumulation": args.gradient_accumulation, "beta": args.beta, "prepare_seconds": prepare_seconds,
        "expected_rows": 1 + len(wanted) + with_trl,
    }
    rows = []

    def add_row(name: str, label: str, by: str, folder: str, trained: bool = True) -> None:
        """Evaluate one saved model and rewrite the section with every row so far (a partial table says so)."""
        metrics, _ = run(f"eval_{name}", [*evaluate, f"--model={folder}"])
        train = f"train_{name}"
        rows.append({"name": name, "label": label, "by": by, "metrics": metrics["pairwise"],
                     "seconds": run.seconds[train] if trained else None, "load": run.loads.get(train)})
        facts.update(minutes=(time.perf_counter() - started) / 60, step_minutes=sum(run.seconds.values()) / 60,
                     load_after=" ".join(f"{x:.2f}" for x in os.getloadavg()),
                     commands=[f"{step}: {command}" for step, command in run.commands.items()])
        table = render(rows, base, facts)
        args.output.write_text(replace_section(args.output.read_text() if args.output.exists() else "", SECTION,
                                               table))
        (args.logs / "results.json").write_text(json.dumps({"rows": rows, "base": base, "facts": facts}, indent=1))

    add_row("untrained", "untrained (policy = reference)", "-", str(model_path()), trained=False)
    for method in wanted:
        if not run.done(f"train_{method.name}"):  # an interrupted run's folder would be resumed: start it afresh
            shutil.rmtree(work / "runs" / method.name, ignore_errors=True)
        out, _ = run(f"train_{method.name}", [*cli, "train", *data, *train_overrides(args, work, method.name),
                                              *method.overrides])
        add_row(method.name, method.label, "mallows_ray", out["export"])
        if method.name == "dpo" and with_trl:
            add_row("trl_dpo", f"DPO (beta {args.beta})", "TRL DPOTrainer", str(work / "runs" / "trl_dpo" / "export"))
    print(render(rows, base, facts))
    print(f"[results] wrote the {SECTION!r} section of {args.output}")


if __name__ == "__main__":
    main()
