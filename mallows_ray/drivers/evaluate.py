"""`mallows-ray eval`: an exported model on a split of `config.data` (prepared, or reused from the cache), in
one process (rank 0 of 1), with the training loop's evaluation passes (`train/evaluation.py`)."""

from __future__ import annotations

from typing import Mapping, Sequence

from mallows_ray.config import Config
from mallows_ray.drivers.train import scored_data
from mallows_ray.export_format import load_export
from mallows_ray.models import response_stats
from mallows_ray.train.conditioning import Conditioner, evaluation_lambdas
from mallows_ray.train.evaluation import EvalSettings, evaluate_rows, evaluate_under_lambdas
from mallows_ray.train.objective import policy_outputs


def evaluate_export(config: Config, model_dir: str, *, split: str = "validation",
                    lambdas: Mapping[str, Sequence[float]] | None = None, address: str | None = None,
                    conditioning: dict | None = None) -> dict[str, dict[str, float]]:
    """Listwise data: {lambda name: metrics} under `lambdas` (default: each vertex and the uniform vector, as
    `lambdas.eval_vertices` and `lambdas.eval_uniform` choose, like the training run's evaluation),
    conditioned as the export records (or as `conditioning` says: e.g. the untrained model evaluated exactly
    like a trained one); pairwise: {"pairwise": metrics}."""
    prepared = scored_data(config, address)
    if split not in prepared.manifest["splits"]:
        raise ValueError(f"the scored data {prepared.folder} has no {split!r} split; it has "
                         f"{', '.join(prepared.manifest['splits'])} (set data.validation for a validation split)")
    rows = [row for batch in prepared.split(split).iter_rows(1024) for row in batch]
    lm, tokenizer, recorded = load_export(model_dir, trust_remote_code=config.model.trust_remote_code)
    loss = config.loss.build()

    def policy(**inputs):
        return policy_outputs(response_stats(lm, **inputs, with_entropy=False, with_wpo=loss.wpo), loss.wpo)

    batch = config.batch.micro_batch_size
    batches = lambda: [rows[i:i + batch] for i in range(0, len(rows), batch)]  # noqa: E731
    settings = EvalSettings(loss, tokenizer.pad_token_id, target_tau=config.lambdas.target_tau,
                            share_prompt=config.model.share_prompt, pack=config.model.pack,
                            max_tokens=config.batch.max_tokens)
    if not loss.listwise:
        return {"pairwise": evaluate_rows(policy, batches(), settings)}
    objectives = prepared.manifest.get("objectives") or []
    # a listwise model trained without lambda (or the base model) sees the plain prompts
    settings_of = conditioning or recorded or {"objectives": objectives, "condition": False, "placement": "system"}
    if settings_of["objectives"] != objectives:
        raise ValueError(f"the model was trained on objectives {settings_of['objectives']}, the data scores "
                         f"{objectives}")
    conditioner = Conditioner(tokenizer, objectives, condition=settings_of["condition"],
                              placement=settings_of["placement"])
    lambdas = lambdas or evaluation_lambdas(objectives, vertices=config.lambdas.eval_vertices,
                                            uniform=config.lambdas.eval_uniform)
    return evaluate_under_lambdas(policy, batches, lambdas, conditioner, settings)
