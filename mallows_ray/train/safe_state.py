"""Resume state that loads without running code from the files: RNG states as safetensors, and DeepSpeed's
checkpoint files through `torch.load(weights_only=True)`.

A pickle can execute anything while it loads, so anyone who can write a run's storage folder could run code on
every worker at resume. Here:

- each rank's RNG states (torch, numpy, Python `random`, CUDA) are plain integer tensors in
  `rng_rank<r>.safetensors`, the few scalars in its JSON metadata;
- DeepSpeed reads its own files (model and optimizer states, `.pt` pickles) through its checkpoint engine,
  which `weights_only_loading` swaps for one that calls `torch.load(weights_only=True)`: tensors, containers
  and plain values only, plus the DeepSpeed types below, which are rebuilt as data (no constructor or method
  of them runs). Anything else in a file stops the load with the file named.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
from typing import Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file


def rng_file(folder: str, rank: int) -> str:
    return f"{folder.rstrip('/')}/rng_rank{rank}.safetensors"


def save_rng(path: str) -> None:
    """This process's RNG states. Python's Mersenne Twister state is 625 words < 2**32, numpy's 624: int64."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "python": torch.tensor(words, dtype=torch.int64),
               "numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    scalars = {"python_version": version, "python_gauss": gauss, "numpy_kind": kind, "numpy_pos": int(pos),
               "numpy_has_gauss": int(has_gauss), "numpy_cached_gaussian": float(cached)}
    save_file(tensors, path, metadata={"scalars": json.dumps(scalars)})  # json floats round-trip exactly


def load_rng(path: str) -> None:
    """Set this process's RNG states from `save_rng`'s file."""
    from mallows_ray.train.checkpoint_files import CheckpointError

    try:
        with safe_open(path, framework="pt") as fh:
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
            scalars = json.loads(fh.metadata()["scalars"])
        random.setstate((scalars["python_version"], tuple(tensors["python"].tolist()), scalars["python_gauss"]))
        np.random.set_state((scalars["numpy_kind"], tensors["numpy"].numpy().astype(np.uint32), scalars["numpy_pos"],
                             scalars["numpy_has_gauss"], scalars["numpy_cached_gaussian"]))
        torch.set_rng_state(tensors["torch"])
    except Exception as err:  # safetensors, json and the setters each have their own error types
        raise CheckpointError(f"RNG state file {path} is damaged: {type(err).__name__}: {err}") from None
    cuda = [tensors[f"cuda{i}"] for i in range(len(tensors)) if f"cuda{i}" in tensors]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)


def deepspeed_safe_types() -> list[type]:
    """The non-torch types in DeepSpeed 0.19's ZeRO 0-3 checkpoint files (found by loading them with
    weights_only=True): the loss scaler (a few numbers), the ZeRO stage enum, a fragment's (start, numel)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str, map_location=None):
    """`torch.load` that rebuilds data only; an error names the file."""
    from mallows_ray.train.checkpoint_files import CheckpointError

    try:
        with torch.serialization.safe_globals(deepspeed_safe_types()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # UnpicklingError (a disallowed type), RuntimeError (a damaged zip), OSError
        text = str(err).strip()
        # torch's UnpicklingError is a page of advice around the one sentence that names the disallowed type
        disallowed = re.search(r"[^\n]*GLOBAL [\w.]+[^\n]*?(?=\. Please use|\.?\n|\.?$)", text)
        reason = (f"{disallowed.group(0).strip().removeprefix('WeightsUnpickler error: ')} (only tensors, plain values "
                  "and DeepSpeed's data types load)" if disallowed else text.splitlines()[-1] if text else "")
        raise CheckpointError(f"checkpoint file {path} was not loaded: {type(err).__name__}: {reason}") from None


class _WeightsOnlyEngine:
    """DeepSpeed's checkpoint engine with `load` replaced; saving and the rest go to the original."""

    def __init__(self, original):
        self._original = original

    def load(self, path: str, map_location=None):
        return load_weights_only(path, map_location)

    def __getattr__(self, name):
        return getattr(self._original, name)


@contextlib.contextmanager
def weights_only_loading(engine) -> Iterator[None]:
    """Within the block, every file `engine.load_checkpoint` reads goes through `load_weights_only`."""
    original = engine.checkpoint_engine
    engine.checkpoint_engine = _WeightsOnlyEngine(original)
    try:
        yield
    finally:
        engine.checkpoint_engine = original
