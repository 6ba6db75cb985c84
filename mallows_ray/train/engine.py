"""The policy on a worker: HF causal LM (+ optional PEFT LoRA) wrapped so that one forward returns the
per-response log-probs, an AdamW + LR schedule, and the DeepSpeed engine around them.

Only the policy is trained here: reference log-probs are columns of the scored dataset.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial

import deepspeed
import torch
from torch import nn

from mallows_ray.config import Config, LoraConfig, ModelConfig, OptimConfig
from mallows_ray.models import compile_layers, load_model, response_stats
from mallows_ray.train.objective import policy_outputs


class PolicyLogprobs(nn.Module):
    """Transformer body + chunked output-embedding head in one module, so DeepSpeed runs both in one forward.

    `response_logprobs` needs the head weight [V, H] outside `lm_head.forward` (it applies it to bounded
    chunks of response positions, never materialising float32 [R, T, V] logits). Under ZeRO-3 a parameter is
    an empty placeholder outside the forward of a module that owns it, so the weight is registered as an
    external parameter of this wrapper: DeepSpeed gathers it for this module's whole forward and backward.
    (Tied embeddings are fine: the tied weight stays gathered after the embedding layer has run.)
    """

    def __init__(self, lm: nn.Module, zero_stage: int, with_wpo: bool = False):
        super().__init__()
        self.lm = lm  # the HF model; with LoRA its attention projections carry the adapters in place
        self.with_wpo = with_wpo  # also return the WPO aligned log-probs (a loss with wpo: true)
        self.tie_grads = zero_stage != 3  # response_stats' in-place tied-embedding gradient (not under ZeRO-3)
        if zero_stage == 3:
            deepspeed.zero.register_external_parameter(self, lm.get_output_embeddings().weight)

    def forward(self, **inputs) -> torch.Tensor | tuple[torch.Tensor | None, ...]:
        """`PackedResponses.model_inputs()` ([rows, T] tensors) -> lp(y) [R], each response's log-prob sum
        (`objective.policy_outputs`: with WPO, or prefix_lengths among the inputs (ld_alpha), the triple
        (lp(y), a(y), lp_l(y)))."""
        return policy_outputs(response_stats(self.lm, **inputs, with_entropy=False, with_wpo=self.with_wpo,
                                             tie_grads=self.tie_grads), self.with_wpo)


def apply_lora(lm: nn.Module, lora: LoraConfig) -> nn.Module:
    """Inject LoRA adapters into `lm` in place and freeze everything else; returns the PeftModel."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(lm, peft_config)


def build_policy(model: ModelConfig, model_path: str, dtype: torch.dtype, zero_stage: int,
                 with_wpo: bool = False) -> PolicyLogprobs:
    lm = load_model(model_path, dtype, trust_remote_code=model.trust_remote_code)
    if model.lora is not None:
        lm = apply_lora(lm, model.lora).get_base_model()  # same modules, now with adapters
    if model.gradient_checkpointing:
        # non-reentrant: works with frozen inputs (LoRA) without enable_input_require_grads
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False  # no KV cache in training forwards
    if model.compile:
        compile_layers(lm)
    # from_pretrained hands the model over in eval mode: train mode from the first step (dropout where the
    # model's config or LoRA asks for it), not only after the first evaluation's engine.train()
    return PolicyLogprobs(lm, zero_stage, with_wpo).train()


def clips_itself(zero_stage: int, dtype: torch.dtype) -> bool:
    """Whether `optimizer_step` computes the global grad norm and clips (fp32 stage 0): there the gradients are
    whole in `p.grad` at the boundary, and DeepSpeed's clipping computes the norm without keeping it, so letting
    it clip too would compute the norm twice (~4% of a SmolLM2 CPU step). ZeRO and DeepSpeed's mixed-precision
    optimizers clip inside their step and record the norm."""
    return zero_stage == 0 and dtype == torch.float32


def deepspeed_config(config: Config, dtype: torch.dtype) -> dict:
    """DeepSpeed's config from ours. Precision follows the model dtype (bf16 on GPU, fp32 on CPU by default)."""
    ds = config.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # lets export consolidate the shards
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": config.batch.micro_batch_size,  # per rank, GPU or not
        "gradient_accumulation_steps": config.batch.gradient_accumulation,
        # fp32 stage 0 clips in `optimizer_step`, which needs the norm anyway (DeepSpeed's clipping discards it)
        "gradient_clipping": 0.0 if clips_itself(ds.zero_stage, dtype) else config.optim.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        # the client optimizer is torch AdamW; ZeRO-Offload would otherwise insist on DeepSpeedCPUAdam (a JIT op)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,  # our own progress line replaces DeepSpeed's
        "wall_clock_breakdown": False,
    }


def lr_factor(step: int, *, schedule: str, warmup: int, total: int) -> float:
    """Multiplier of the base LR after `step` optimizer steps: linear warmup, then constant/linear/cosine to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def build_optimizer(params: list[nn.Parameter], optim: OptimConfig) -> torch.optim.AdamW:
    """torch AdamW with the fused kernel: one pass over each tensor instead of a dozen elementwise ops with
    temporaries (on CPU, 135M parameters: 0.08 s instead of 0.34 s per step; benchmarks/README.md). Same
    update as the for-loop AdamW within float rounding (tests/unit/test_engine.py)."""
    return torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay,
                             fused=True)


def skip_shared_memory_all_reduce() -> None:
    """Keep DeepSpeed's communication backend from compiling its shared-memory all-reduce kernel.

    On the CPU accelerator the backend JIT-compiles it with gcc when it starts (35-50 s on 2 cores, on the
    first run of a machine and again whenever ninja sees other flags: seen twice in one session) for
    `inference_all_reduce` alone, which training never calls. Marked unavailable, as on a platform without
    the kernel, the backend runs every collective through torch.distributed (gloo or NCCL), as it did anyway.
    """
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_engine(policy: PolicyLogprobs, config: Config, dtype: torch.dtype, total_steps: int):
    """The DeepSpeed engine; it owns the optimizer and steps (and checkpoints) the LR scheduler."""
    skip_shared_memory_all_reduce()
    optim: OptimConfig = config.optim
    optimizer = build_optimizer([p for p in policy.parameters() if p.requires_grad], optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_factor, schedule=optim.schedule, warmup=optim.warmup_steps, total=total_steps))
    engine, *_ = deepspeed.initialize(model=policy, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=deepspeed_config(config, dtype))
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # one rank has nothing to average: stage 0's all-reduce would still flatten every gradient into one
        # bucket and copy it back (~10% of a SmolLM2 CPU step on one worker)
        engine.enable_backward_allreduce = False
    return engine


def backward(engine, loss: torch.Tensor, boundary: bool) -> None:
    """Backward of one micro-batch's part of the step's loss, already scaled by the caller (its rows' losses
    over the rank's rows of the step); `boundary`: the step's last micro-batch, after which `optimizer_step`
    steps. With `batch.max_tokens` micro-batches differ in size and number from step to step, so DeepSpeed's
    division by the configured accumulation and its micro-step count are both set aside."""
    engine.set_gradient_accumulation_boundary(boundary)
    engine.backward(loss, scale_wrt_gas=False)


def optimizer_step(engine, max_grad_norm: float) -> float | None:
    """`engine.step()` after each micro-batch's backward; at an accumulation boundary the optimizer steps and
    the pre-clipping global grad norm is returned (None between boundaries).

    fp32 stage 0 (`clips_itself`): the all-reduced gradients are whole in `p.grad` before the step, so the norm
    is computed here, once (`grad_norm`), and the step clips to `max_grad_norm` (0: no clipping) with it
    (`clipped_in_step`), as `torch.nn.utils.clip_grad_norm_` would. ZeRO and DeepSpeed's mixed-precision
    optimizers clip while stepping and record the norm.
    """
    boundary = engine.is_gradient_accumulation_boundary()
    if not (boundary and clips_itself(engine.zero_optimization_stage(), next(engine.module.parameters()).dtype)):
        engine.step()
        return float(engine.get_global_grad_norm()) if boundary else None
    norm = grad_norm([p.grad for p in engine.module.parameters() if p.grad is not None])
    with clipped_in_step(engine.optimizer, norm, max_grad_norm):
        engine.step()
    return float(norm)


# Gradient elements per dot product in `grad_norm`: small enough that fp32 accumulation inside one dot stays
# ~1e-7 relative, large enough that the per-call overhead is nothing (SmolLM2's 135M: ~130 dots).
NORM_CHUNK = 1 << 20


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm sqrt(sum_i ||g_i||^2) of `grads` (what `torch.nn.utils.get_total_norm` gives), summed
    from BLAS dot products over chunks of `NORM_CHUNK` elements.

    On this CPU that is 5x faster than `torch.linalg.vector_norm` on SmolLM2's [49152, 576] embedding gradient
    (2.6 vs 12.3 ms; 36 vs 65 ms over the whole model) and closer to the float64 norm on a 28M-element fp32
    vector (1e-7 relative error against vector_norm's 1.7e-3); benchmarks/README.md. Summed in fp32 whatever
    the gradients' dtype (a no-op for fp32 ones): a bf16 sum would round each chunk's square to 8 bits, and the
    fused AdamW takes its `grad_scale` (`clipped_in_step`) as an fp32 tensor only.
    """
    return torch.stack([torch.dot(c, c) for g in grads for c in g.float().reshape(-1).split(NORM_CHUNK)]).sum().sqrt()


@contextmanager
def clipped_in_step(optimizer: torch.optim.Optimizer, norm: torch.Tensor, max_grad_norm: float):
    """Within the block, the fused AdamW's step multiplies every gradient by max_grad_norm / (norm + 1e-6)
    (`clip_grad_norm_`'s factor) when that is below 1 (max_grad_norm 0: never).

    The factor goes in as the optimizer's `grad_scale`, by which the fused kernel divides each gradient as it
    reads it (the hook torch's GradScaler uses to unscale), instead of a pass over every gradient before the
    step: one read and write of the whole gradient less (38 ms of a ~1.5 s SmolLM2 CPU step).
    """
    clip = 0 < max_grad_norm < float(norm)
    if clip:
        if not optimizer.defaults.get("fused"):
            raise TypeError(f"clipped_in_step needs a fused torch optimizer (build_optimizer's); got {optimizer!r}")
        optimizer.grad_scale = (norm + 1e-6) / max_grad_norm
    try:
        yield
    finally:
        if clip:
            del optimizer.grad_scale


def parameter_counts(engine) -> dict[str, int]:
    """Model size, trainable size, and how many parameter values this rank holds (ZeRO-3: its partition)."""
    params = list(engine.module.parameters())  # tied weights are one Parameter: counted once
    if engine.zero_optimization_stage() == 3:
        total = sum(p.ds_numel for p in params)          # outside a forward p.numel() is 0 (a placeholder)
        local = sum(p.ds_tensor.numel() for p in params)  # this rank's shard, padding included
        trainable = sum(p.ds_numel for p in params if p.requires_grad)
    else:
        total = local = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
    return {"total": total, "trainable": trainable, "local": local}
