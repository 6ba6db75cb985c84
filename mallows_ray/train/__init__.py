"""Distributed preference optimisation: Ray Train workers running DeepSpeed on the policy.

    run_training(config, address=None) -> TrainResult      the driver (`mallows-ray train`)
    train_loop_per_worker(loop_config)                      what each worker runs (loop.py)

Modules: plan.py (what the driver works out for the workers), batches.py (deterministic global batches,
per-rank slices, tensors), objective.py (forward + loss inputs), engine.py (model, LoRA, DeepSpeed),
checkpoint.py (save/restore through Ray Train), checkpoint_files.py (completion records, the newest complete
checkpoint, file checks), safe_state.py (RNG as safetensors, DeepSpeed files loaded weights-only), run_dir.py
(run folder marker, the only deletion), metrics.py (cross-rank reduction, logs), export.py (HF folder),
loop.py, trainer.py.
"""

from mallows_ray.train.trainer import TrainResult, run_training

__all__ = ["TrainResult", "run_training"]
