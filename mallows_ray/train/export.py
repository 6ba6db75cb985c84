"""The final export: an HF folder that `AutoModelForCausalLM.from_pretrained` loads.

Without LoRA: the full model (safetensors) + tokenizer. With LoRA: the adapter (`adapter_config.json` +
`adapter_model.safetensors`, loadable with PEFT or directly by transformers' PEFT integration) + tokenizer,
and with `export.merge_lora` the merged full model in `<export>/merged`.
"""

from __future__ import annotations

import logging
import os

import torch

from mallows_ray.config import Config
from mallows_ray.export_format import write_conditioning
from mallows_ray.models import load_model
from mallows_ray.train.engine import apply_lora

log = logging.getLogger(__name__)

MERGED = "merged"


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The whole policy's state dict on rank 0 (None elsewhere), keys as in the HF model.

    Collective under ZeRO-3: every rank must call it. DeepSpeed gathers one layer at a time into rank 0's
    CPU memory (the helper HF's Trainer and accelerate use too), so no rank ever holds all shards at once
    on the accelerator. For stages 0-2 the module's parameters are already whole on every rank.
    """
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # keeps the training dtype despite the name
    elif engine.global_rank == 0:
        state = engine.module.state_dict()
    else:
        state = None
    if state is None:
        return None
    prefix = "lm."  # the PolicyLogprobs wrapper
    return {k[len(prefix):]: v.detach().cpu() for k, v in state.items()}


def export_model(engine, config: Config, model_path: str, tokenizer, out_dir: str,
                 conditioning: dict | None = None) -> None:
    """Collective: all ranks call it; rank 0 writes `out_dir` (and, for a lambda-conditioned listwise run,
    the conditioning settings that `generate` and `eval` read)."""
    state = full_state_dict(engine)
    if state is None:
        return
    dtype = next(iter(state.values())).dtype
    # a fresh CPU copy of the starting model receives the weights: it keeps its config, generation config and
    # name_or_path (which PEFT records as the adapter's base model)
    lm = load_model(model_path, dtype, trust_remote_code=config.model.trust_remote_code)
    lora = config.model.lora
    target = apply_lora(lm, lora) if lora is not None else lm
    (target.get_base_model() if lora is not None else target).load_state_dict(state, strict=True)
    target.save_pretrained(out_dir, safe_serialization=True)  # PeftModel: only the adapter
    folders = [out_dir]
    if lora is not None and config.export.merge_lora:
        merged_dir = os.path.join(out_dir, MERGED)
        target.merge_and_unload().save_pretrained(merged_dir, safe_serialization=True)
        folders.append(merged_dir)
    for folder in folders:
        tokenizer.save_pretrained(folder)
        if conditioning is not None:
            write_conditioning(folder, conditioning)
    log.info(f"[train] exported the policy to {out_dir}")
