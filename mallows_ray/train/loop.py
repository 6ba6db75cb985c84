"""`train_loop_per_worker`: what every Ray Train worker runs, top to bottom.

B = prompts per micro-batch, N = responses per prompt (pairwise: 2), R = B x N packed rows, T = padded length,
K = objectives (listwise). One optimizer step consumes one global batch of micro x accumulation x workers
prompts (`batches.py`), cut into micro-batches of `micro` prompts or by a token budget (`batch.max_tokens`).
Listwise losses: each prompt of the global batch gets a lambda from the scheduler and, with conditioning, a
policy prompt with lambda rendered in (`lambda_training.py`, ALGORITHMS 3.1-3.2); pairwise
losses run the same loop with its null version.
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

from mallows_ray.config import Config
from mallows_ray.data.scored_split import ScoredSplit
from mallows_ray.models import load_tokenizer
from mallows_ray.runtime import pick_dtype, worker_threads
from mallows_ray.train import checkpoint
from mallows_ray.train.batches import budget_micro_batches, collate, epoch_order, micro_batches, rank_slice
from mallows_ray.train.engine import backward, build_engine, build_policy, optimizer_step, parameter_counts
from mallows_ray.train.evaluation import EvalSettings
from mallows_ray.train.export import export_model
from mallows_ray.train.lambda_training import PairwiseTraining, lambda_training
from mallows_ray.train.metrics import ExampleLog, MetricSums, progress_line, rank_extremes
from mallows_ray.train.objective import forward_loss
from mallows_ray.train.plan import TrainPlan
from mallows_ray.typed_config import from_dict

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


def read_counts(split: ScoredSplit) -> dict[str, float]:
    """The largest of any rank's training rows read since this attempt started (collective). Each rank reads
    only its slice of every global batch: ~rows / W a rank per epoch."""
    _, rows_read = rank_extremes(split.rows_read)
    return {"data/rows_read_max": rows_read}


def step_micro_batches(rows: list[dict], config: Config, copies: int) -> list[list[dict]]:
    """A rank's rows of one step as micro-batches of `batch.micro_batch_size` prompts, or with `batch.max_tokens`
    of at most that many positions each, as many as on the rank that needs the most (collective). `copies`
    rows per prompt (lambda copies, `lambda_training`) stay together."""
    if config.batch.max_tokens == 0:
        return micro_batches(rows, config.batch.micro_batch_size * copies)  # `accumulation` micro-batches
    return budget_micro_batches(rows, config.batch.max_tokens, group=copies, share_prompt=config.model.share_prompt,
                                pack=config.model.pack)


def evaluate(engine, training: PairwiseTraining, batches: list[list[dict]]) -> dict[str, float]:
    """The validation split's global `batches` through `training.evaluate`, keys prefixed `eval/`."""
    engine.eval()
    metrics = training.evaluate(engine, batches)
    engine.train()
    return {f"eval/{name}": value for name, value in metrics.items()}


def train_loop_per_worker(loop_config: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Train on this rank; rank 0 returns its logged metrics (one dict per log step of this attempt)."""
    # ---- setup: everything comes from loop_config, nothing from module globals
    config: Config = from_dict(Config, loop_config["config"])
    plan = TrainPlan(**loop_config["plan"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(worker_threads(config.scaling.threads_per_worker, context.get_local_world_size()))
    micro = config.batch.micro_batch_size
    device = ray.train.torch.get_device()
    dtype = pick_dtype(config.model.dtype, device)  # auto: bf16 on GPU, fp32 on CPU
    loss = config.loss.build()

    # ---- model: every rank builds identical weights (LoRA's random init included) from the same seed
    seed_everything(config.run.seed)
    tokenizer = load_tokenizer(plan.model_path, trust_remote_code=config.model.trust_remote_code)
    policy = build_policy(config.model, plan.model_path, dtype, config.deepspeed.zero_stage, loss.wpo)
    engine = build_engine(policy, config, dtype, plan.total_steps)
    counts = parameter_counts(engine)
    local_min, local_max = rank_extremes(counts["local"] / counts["total"])
    params = {"params/total": counts["total"], "params/trainable": counts["trainable"],
              "params/local_fraction_min": local_min, "params/local_fraction_max": local_max,
              "threads_per_worker": torch.get_num_threads()}
    seed_everything(config.run.seed + 1 + rank)  # distinct dropout streams per rank from here on
    settings = EvalSettings(loss, tokenizer.pad_token_id, rank, world, config.lambdas.target_tau,
                            config.model.share_prompt, config.model.pack, engine.device, config.batch.max_tokens)

    # ---- data: each rank reads its rows of the scored parquet itself (data/scored_split.py; the driver
    # checked its columns and row count, drivers/train.py's check_splits)
    train = plan.open_split("train")
    lengths = train.padded_lengths(config.model.share_prompt) if config.batch.group_by_length else None

    # ---- lambdas (listwise losses): scheduler, conditioner, the learned scheduler's fixed batch; a null
    # version for pairwise losses
    training = lambda_training(config, settings, tokenizer, plan, train)

    # the validation split, read once at the first evaluation and kept (every rank reads it whole, in stored
    # order): every evaluation, and every lambda within one, runs the same rows
    validation = functools.cache(lambda: list(plan.open_split("validation").iter_rows(micro * world)))

    # ---- resume: weights, optimizer, LR schedule, RNGs, the data position and the scheduler's state
    step, saved = checkpoint.restore(engine, plan)
    training.load_state_dict(saved)
    examples = ExampleLog(plan.run_dir, rank, enabled=plan.local_run_dir)

    # ---- train: one optimizer step per global batch
    if config.model.compile and rank == 0:  # the first step then takes far longer: say why before it starts
        log.info("[train] model.compile: the first step compiles the decoder layers (~40 s on 2 CPU cores from an "
                 "empty compile cache; an evaluation's first batch compiles its own graph), the later ones run "
                 "compiled")
    sums, history = MetricSums(), []
    if config.run.eval_at_start and step == 0 and plan.has_validation:  # the baseline: policy == initial weights
        baseline = {"step": 0, **evaluate(engine, training, validation())}
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
            rows = training.step_rows(rows, len(global_indices), step, rank, world)  # under their lambdas
            parts = step_micro_batches(rows, config, training.copies)
            for i, micro_rows in enumerate(parts):
                batch = collate(micro_rows, tokenizer.pad_token_id, with_scores=loss.listwise,
                                share_prompt=config.model.share_prompt, pack=config.model.pack).to(engine.device)
                out = forward_loss(engine, batch, loss, config.lambdas.target_tau)  # out.losses [B]
                # the rank's mean over its rows of the step, a micro-batch at a time; DeepSpeed averages ranks
                backward(engine, out.losses.sum() / len(rows), boundary=i == len(parts) - 1)
                grad_norm = optimizer_step(engine, config.optim.max_grad_norm)  # steps after the last micro-batch
                sums.add_loss_output(out, batch.dispersion)
                sums.add("tokens", batch.tokens)
                sums.add("micro_batches", 1)
            step += 1
            examples.write(step, ids)
            training.after_step(engine, step)  # the learned scheduler's update, every rank alike

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
                metrics.update(training.log_dict())
                if run_eval:
                    metrics.update(evaluate(engine, training, validation()))
                if rank == 0:
                    pace = (time.perf_counter() - attempt_start) / (step - first_step)  # s per step, evals included
                    log.info(progress_line(metrics, plan.total_steps, eta_s=pace * (plan.total_steps - step)))
                    history.append(metrics)
                # Ray gets checkpoints and evaluations, not every log step: its controller takes one report
                # per poll (every 2 s) and a worker blocks until its previous report is taken
                if save or run_eval:
                    checkpoint.report(metrics, engine, plan, step, save=save, state=training.state_dict())
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
        export_model(engine, config, plan.model_path, tokenizer, plan.export_dir, conditioning=training.describe())
    return history if rank == 0 else None  # Ray hands rank 0's return value to the driver
