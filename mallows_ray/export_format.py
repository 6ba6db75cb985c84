"""An export folder: an HF model folder (full weights, or a LoRA adapter naming its base model) and, for a
listwise run, `lambda_conditioning.json`: the objectives and where training rendered the weights line, which
`generate` and `eval` need to condition prompts the way training did. Written by the training workers
(`train/export.py`), read by the drivers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from mallows_ray.models import load_model, load_tokenizer

CONDITIONING_FILE = "lambda_conditioning.json"


def write_conditioning(folder: str, settings: dict[str, Any]) -> None:
    with open(os.path.join(folder, CONDITIONING_FILE), "w") as fh:
        json.dump(settings, fh, indent=2)


def read_conditioning(folder: str) -> dict[str, Any] | None:
    """The export's conditioning settings, or None for a model not trained with lambda (pairwise). An export
    written before `placement` records `system_role` (true: system, false: user_prefix) instead."""
    path = os.path.join(folder, CONDITIONING_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        settings = json.load(fh)
    if "system_role" in settings:
        settings["placement"] = "system" if settings.pop("system_role") else "user_prefix"
    return settings


def load_export(folder: str | Path, *, trust_remote_code: bool = False):
    """(model in eval mode, tokenizer, conditioning settings or None) of an export folder: full weights, or a
    LoRA adapter merged into the base model it names."""
    folder = str(folder)
    if os.path.isfile(os.path.join(folder, "adapter_config.json")):
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(folder, use_safetensors=True,
                                                         trust_remote_code=trust_remote_code).merge_and_unload()
    else:
        model = load_model(folder, torch.float32, trust_remote_code=trust_remote_code)
    return model.eval(), load_tokenizer(folder, trust_remote_code=trust_remote_code), read_conditioning(folder)
