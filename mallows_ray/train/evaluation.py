"""Evaluation passes: the loss and reward metrics of a policy over batches of scored rows, and the listwise
metrics under given lambdas. Used by the training loop (sharded over ranks, one all-reduce per pass) and by
`mallows-ray eval` (one process: rank 0 of 1).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import torch

from mallows_ray.train.batches import Row, collate, eval_slice
from mallows_ray.train.conditioning import Conditioner
from mallows_ray.train.metrics import MetricSums
from mallows_ray.train.objective import forward_loss, policy_outputs


def evaluate_rows(model: Callable[..., torch.Tensor], global_batches: Iterable[list[Row]], *, rank: int, world: int,
                  pad_id: int, loss_fn, listwise: bool, target_tau: float = 1.0, share_prompt: bool = False,
                  pack: bool = False, device: torch.device | None = None, with_ld: bool = False,
                  transform: Callable[[list[Row]], list[Row]] | None = None) -> dict[str, float]:
    """Metrics (as `MetricSums.reduce`) of `model` over every row of `global_batches`; rank r runs its
    `eval_slice` of each batch. `transform` maps a rank's rows before collation (e.g. lambda conditioning).
    Collective when torch.distributed is initialised: all ranks must see the same batches."""
    sums = MetricSums()
    with torch.no_grad():
        for global_rows in global_batches:
            rows, count = eval_slice(global_rows, rank, world)  # every rank runs the same number of forwards
            if transform is not None:
                rows = transform(rows)
            batch = collate(rows, pad_id, with_scores=listwise, share_prompt=share_prompt, pack=pack)
            if device is not None:
                batch = batch.to(device)
            out = forward_loss(model, batch, loss_fn, listwise, target_tau, with_ld)
            sums.add_loss_output(out, batch.dispersion, count)
    return sums.reduce()


def evaluate_under_lambdas(model: Callable[..., torch.Tensor], batches: Callable[[], Iterable[list[Row]]],
                           lambdas: Mapping[str, Sequence[float]], conditioner: Conditioner,
                           **kwargs) -> dict[str, dict[str, float]]:
    """{name: metrics} of `evaluate_rows` with every row conditioned on lambdas[name]. For a vertex lambda,
    `rewards/accuracy` is the listwise top-1 accuracy and `loss` the listwise loss of that objective alone.
    `batches()` gives a fresh iterable of the same global batches for each lambda."""
    return {name: evaluate_rows(model, batches(), transform=lambda rows, lam=lam: conditioner.apply_one(rows, lam),
                                **kwargs)
            for name, lam in lambdas.items()}


def evaluate_export(config, model_dir: str, *, split: str = "validation", lambdas: Mapping[str, Sequence[float]] |
                    None = None, address: str | None = None,
                    conditioning: dict | None = None) -> dict[str, dict[str, float]]:
    """`mallows-ray eval`: an exported model on a split of `config.data` (prepared, or reused from the cache),
    in one process. Listwise data: {lambda name: metrics} under `lambdas` (default: each vertex and the
    uniform vector), conditioned as the export records (or as `conditioning` says: e.g. the untrained model
    evaluated exactly like a trained one); pairwise: {"pairwise": metrics}."""
    from mallows_ray.generate import load_export
    from mallows_ray.models import response_stats
    from mallows_ray.train.conditioning import evaluation_lambdas
    from mallows_ray.train.trainer import scored_data

    prepared = scored_data(config, address)
    if split not in prepared.manifest["splits"]:
        raise ValueError(f"the scored data {prepared.folder} has no {split!r} split; it has "
                         f"{', '.join(prepared.manifest['splits'])} (set data.validation for a validation split)")
    rows = [row for batch in prepared.split(split).iter_rows(1024) for row in batch]
    lm, tokenizer, recorded = load_export(model_dir, trust_remote_code=config.model.trust_remote_code)
    conditioning = conditioning or recorded
    wpo = config.loss.uses_wpo

    def policy(**inputs):
        return policy_outputs(response_stats(lm, **inputs, with_entropy=False, with_wpo=wpo), wpo)

    batch = config.batch.micro_batch_size
    batches = lambda: [rows[i:i + batch] for i in range(0, len(rows), batch)]  # noqa: E731
    common = dict(rank=0, world=1, pad_id=tokenizer.pad_token_id, loss_fn=config.loss.build(),
                  listwise=config.loss.listwise, target_tau=config.lambdas.target_tau,
                  share_prompt=config.model.share_prompt, pack=config.model.pack, with_ld=config.loss.uses_ld)
    if not common["listwise"]:
        return {"pairwise": evaluate_rows(policy, batches(), **common)}
    objectives = prepared.manifest.get("objectives") or []
    settings = conditioning or {"objectives": objectives, "condition": False, "placement": "system"}
    if settings["objectives"] != objectives:
        raise ValueError(f"the model was trained on objectives {settings['objectives']}, the data scores {objectives}")
    conditioner = Conditioner(tokenizer, objectives, condition=settings["condition"], placement=settings["placement"])
    return evaluate_under_lambdas(policy, batches, lambdas or evaluation_lambdas(objectives), conditioner, **common)
