"""`train_loop_per_worker`: what every Ray Train worker runs, top to bottom.

B = prompts per micro-batch, N = responses per prompt (pairwise: 2), R = B x N packed rows, T = padded length,
K = objectives (listwise). One optimizer step consumes one global batch of micro x accumulation x workers
prompts (`batches.py`). Listwise losses: each prompt of the global batch gets a lambda from the scheduler and,
with conditioning, a policy prompt with lambda rendered in (`conditioning.py`, ALGORITHMS 3.1-3.2).
"""

from __future__ import annotations

import functools
import logging
import os
import random
import time
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch

from mallows_ray.config import Config, LambdaConfig, from_dict
from mallows_ray.data.scored_split import ScoredSplit
from mallows_ray.models import load_tokenizer
from mallows_ray.runtime import pick_dtype
from mallows_ray.train import checkpoint
from mallows_ray.train.batches import collate, epoch_order, micro_batches, rank_slice
from mallows_ray.train.conditioning import (
    Conditioner, build_lambda_scheduler, copies_per_prompt, evaluation_lambdas, step_lambdas, training_rows,
)
from mallows_ray.train.engine import build_engine, build_policy, optimizer_step, parameter_counts
from mallows_ray.train.evaluation import evaluate_rows, evaluate_under_lambdas
from mallows_ray.train.export import export_model
from mallows_ray.train.metrics import COUNTS, ExampleLog, MetricSums, progress_line, rank_extremes
from mallows_ray.train.objective import forward_loss
from mallows_ray.train.plan import TrainPlan

# logging, not print: Ray Train tees a worker's print to its logger and to stdout, so the driver shows it twice
log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def inject_failure_once(plan: TrainPlan, step: int, rank: int) -> None:
    """`run.fail_at_step` (tests): rank 0 raises after this step, once per run: a marker file in the run folder
    outlives the restart. Collective, so every rank's report of this step reaches Ray before the raise and
    the step's checkpoint, if any, is committed."""
    marker = os.path.join(plan.run_dir, f"fail_at_step_{step}.done")
    if not plan.local_run_dir or os.path.exists(marker):
        return
    torch.distributed.barrier()  # every rank has checked the marker and returned from its report
    if rank == 0:
        open(marker, "w").close()
        raise RuntimeError(f"run.fail_at_step: injected failure after step {step}")


def first_rows(split: ScoredSplit, n: int) -> list[dict]:
    """The first n rows of a split (the learned scheduler's fixed batch; every rank gets the same rows)."""
    return split.take(range(min(n, len(split))))


def read_counts(split: ScoredSplit) -> dict[str, float]:
    """The largest of any rank's training rows read since this attempt started (collective). Each rank reads
    only its slice of every global batch: ~rows / W a rank per epoch."""
    _, rows_read = rank_extremes(split.rows_read)
    return {"data/rows_read_max": rows_read}


def evaluate(engine, batches: list[list[dict]], common: dict[str, Any], conditioner: Conditioner | None,
             lambda_cfg: LambdaConfig) -> dict[str, float]:
    """Metrics of the validation split's global `batches`, keys prefixed `eval/`. Listwise: with
    `lambda_cfg.eval_vertices` under each objective's vertex (`eval/<objective>/...`), with `eval_uniform` under
    the uniform lambda (`eval/uniform/...`); unprefixed: the uniform pass's, else the mean over the vertices."""
    engine.eval()
    if conditioner is None:
        metrics = evaluate_rows(engine, batches, **common)
    else:
        lambdas = {name: lam for name, lam in evaluation_lambdas(conditioner.objectives).items()
                   if (lambda_cfg.eval_uniform if name == "uniform" else lambda_cfg.eval_vertices)}
        per_lambda = evaluate_under_lambdas(engine, lambda: batches, lambdas, conditioner, **common)
        metrics = {f"{name}/{key}": value for name, values in per_lambda.items()
                   for key, value in values.items() if key not in COUNTS}
        passes = [per_lambda["uniform"]] if "uniform" in per_lambda else list(per_lambda.values())
        metrics.update({key: sum(p[key] for p in passes) / len(passes) for key in passes[0]})
    engine.train()
    return {f"eval/{name}": value for name, value in metrics.items()}


def score_candidates(engine, scheduler, rows: list[dict], conditioner: Conditioner,
                     common: dict[str, Any]) -> torch.Tensor:
    """score_j [M] of ALGORITHMS 3.2: the top-1 listwise accuracy of the lambda_j-conditioned policy against
    p_lambda_j on the fixed batch `rows`."""
    candidates = {str(j): lam for j, lam in enumerate(scheduler.candidates.tolist())}
    engine.eval()
    per_lambda = evaluate_under_lambdas(engine, lambda: [rows], candidates, conditioner, **common)
    engine.train()
    return torch.tensor([per_lambda[j]["rewards/accuracy"] for j in candidates], dtype=torch.float64)


def train_loop_per_worker(loop_config: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Train on this rank; rank 0 returns its logged metrics (one dict per log step of this attempt)."""
    # ---- setup: everything comes from loop_config, nothing from module globals
    config: Config = from_dict(Config, loop_config["config"])
    plan = TrainPlan(**loop_config["plan"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    micro = config.batch.micro_batch_size
    device = ray.train.torch.get_device()
    dtype = pick_dtype(config.model.dtype, device)  # auto: bf16 on GPU, fp32 on CPU
    loss_fn = config.loss.build()
    listwise = config.loss.listwise
    lambda_cfg = config.lambdas

    # ---- model: every rank builds identical weights (LoRA's random init included) from the same seed
    seed_everything(config.run.seed)
    tokenizer = load_tokenizer(plan.model_path, trust_remote_code=config.model.trust_remote_code)
    policy = build_policy(config.model, plan.model_path, dtype, config.deepspeed.zero_stage, config.loss.uses_wpo)
    engine = build_engine(policy, config, dtype, plan.total_steps)
    counts = parameter_counts(engine)
    local_min, local_max = rank_extremes(counts["local"] / counts["total"])
    params = {"params/total": counts["total"], "params/trainable": counts["trainable"],
              "params/local_fraction_min": local_min, "params/local_fraction_max": local_max}
    seed_everything(config.run.seed + 1 + rank)  # distinct dropout streams per rank from here on
    common = dict(rank=rank, world=world, pad_id=tokenizer.pad_token_id, loss_fn=loss_fn, listwise=listwise,
                  target_tau=lambda_cfg.target_tau, share_prompt=config.model.share_prompt, pack=config.model.pack,
                  device=engine.device, with_ld=config.loss.uses_ld)  # evaluation settings

    # ---- data: each rank reads its rows of the scored parquet itself (data/scored_split.py; the driver
    # checked its columns and row count, trainer.check_splits)
    train = plan.open_split("train")
    lengths = train.padded_lengths(config.model.share_prompt) if config.batch.group_by_length else None

    # ---- listwise: the lambda scheduler, the conditioner, the learned scheduler's fixed validation batch
    scheduler = conditioner = None
    update_every, update_rows = 0, []
    copies = 1  # rows per prompt in a micro-batch: K (+ 1) with lambdas.vertex_copies
    if listwise:
        conditioner = Conditioner.from_config(tokenizer, plan.objectives, lambda_cfg)
        copies = copies_per_prompt(lambda_cfg, len(plan.objectives))
        scheduler = build_lambda_scheduler(lambda_cfg, plan.objectives)
        if scheduler.needs_eval:
            update_every = lambda_cfg.update_every or config.run.eval_every
            if update_every == 0:
                raise ValueError("the learned lambda scheduler needs lambdas.update_every or run.eval_every > 0")
            fixed = plan.open_split("validation") if plan.has_validation else train
            update_rows = first_rows(fixed, lambda_cfg.update_prompts)

    # the validation split, read once at the first evaluation and kept (every rank reads it whole, in stored
    # order): every evaluation, and every lambda within one, runs the same rows
    validation = functools.cache(lambda: list(plan.open_split("validation").iter_rows(micro * world)))

    # ---- resume: weights, optimizer, LR schedule, RNGs, the data position and the scheduler's state
    step, saved = checkpoint.restore(engine, plan)
    if scheduler is not None and "lambda_scheduler" in saved:
        scheduler.load_state_dict(saved["lambda_scheduler"])
    examples = ExampleLog(plan.run_dir, rank, enabled=plan.local_run_dir)

    # ---- train: one optimizer step per global batch
    sums, history = MetricSums(), []
    if config.run.eval_at_start and step == 0 and plan.has_validation:  # the baseline: policy == initial weights
        baseline = {"step": 0, **evaluate(engine, validation(), common, conditioner, lambda_cfg)}
        if rank == 0:
            log.info(f"[train] step 0 (before training) | eval loss {baseline['eval/loss']:.4f} "
                     f"acc {baseline['eval/rewards/accuracy']:.3f}")
            history.append(baseline)
    interval_start = attempt_start = time.perf_counter()
    first_step = step
    while step < plan.total_steps:
        epoch, consumed = plan.position(step)
        batches = epoch_order(len(train), global_batch_size=plan.global_batch_size, seed=config.run.seed,
                              epoch=epoch, shuffle=config.batch.shuffle, lengths=lengths)  # row indices
        for global_indices in batches[consumed:]:  # skip what a resumed run already did, without reading it
            lr = engine.get_lr()[0]
            rows = train.take(rank_slice(global_indices, rank, world))  # micro x accumulation prompts
            ids = [row["id"] for row in rows]
            if listwise:  # lambdas [global batch, K], drawn for the whole global batch, then sliced
                lambdas = step_lambdas(scheduler, len(global_indices), seed=config.run.seed, step=step)
                rows = training_rows(conditioner, rows, rank_slice(lambdas.tolist(), rank, world), lambda_cfg)
            for micro_rows in micro_batches(rows, micro * copies):       # `accumulation` micro-batches
                batch = collate(micro_rows, tokenizer.pad_token_id, with_scores=listwise,
                                share_prompt=config.model.share_prompt, pack=config.model.pack).to(engine.device)
                out = forward_loss(engine, batch, loss_fn, listwise, lambda_cfg.target_tau,
                                   config.loss.uses_ld)  # out.losses [B]
                engine.backward(out.losses.mean())  # DeepSpeed divides by `accumulation`; ranks are averaged
                grad_norm = optimizer_step(engine)  # the optimizer steps after the last micro-batch only
                sums.add_loss_output(out, batch.dispersion)
                sums.add("tokens", batch.tokens)
            step += 1
            examples.write(step, ids)
            if update_every and step % update_every == 0:  # learned scheduler: identical update on every rank
                scheduler.update(score_candidates(engine, scheduler, update_rows, conditioner, common))

            # ---- log / evaluate / checkpoint (collective: every rank decides the same way from `step`)
            last = step == plan.total_steps
            save = last or (config.run.checkpoint_every > 0 and step % config.run.checkpoint_every == 0)
            run_eval = plan.has_validation and (
                last or (config.run.eval_every > 0 and step % config.run.eval_every == 0))
            if save or run_eval or step % config.run.log_every == 0:
                metrics = sums.reduce()
                seconds = time.perf_counter() - interval_start
                metrics.update(step=step, epoch=epoch, lr=lr, grad_norm=grad_norm,
                               tokens_per_s=metrics["tokens"] / seconds, samples_per_s=metrics["examples"] / seconds,
                               **params, **read_counts(train))
                if scheduler is not None:
                    metrics.update(scheduler.log_dict())
                if run_eval:
                    metrics.update(evaluate(engine, validation(), common, conditioner, lambda_cfg))
                if rank == 0:
                    pace = (time.perf_counter() - attempt_start) / (step - first_step)  # s per step, evals included
                    log.info(progress_line(metrics, plan.total_steps, eta_s=pace * (plan.total_steps - step)))
                    history.append(metrics)
                # Ray gets checkpoints and evaluations, not every log step: its controller takes one report
                # per poll (every 2 s) and a worker blocks until its previous report is taken
                if save or run_eval:
                    state = {"lambda_scheduler": scheduler.state_dict()} if scheduler is not None else {}
                    checkpoint.report(metrics, engine, plan, step, save=save, state=state)
                interval_start = time.perf_counter()
            if step == config.run.fail_at_step:
                inject_failure_once(plan, step, rank)
            if last:
                break
        else:  # the epoch ran out: it must have been a whole one, or the data changed under the run
            if plan.position(step)[1] != 0:
                raise RuntimeError(f"epoch {epoch} of {plan.data_folder} ended after step {step}; expected "
                                   f"{plan.steps_per_epoch} global batches per epoch")

    # ---- export: collective under ZeRO-3, rank 0 writes
    if plan.export_dir is not None:
        export_model(engine, config, plan.model_path, tokenizer, plan.export_dir,
                     conditioning=conditioner.describe() if conditioner is not None else None)
    return history if rank == 0 else None  # Ray hands rank 0's return value to the driver
