"""What runs on the Ray Train workers: DeepSpeed on the policy (the driver is `drivers/train.py`).

    train_loop_per_worker(loop_config)      loop.py: what each worker runs, top to bottom

Modules: plan.py (what the driver works out for the workers), batches.py (deterministic global batches,
per-rank slices, tensors), objective.py (forward + loss inputs), engine.py (model, LoRA, DeepSpeed),
conditioning.py (lambda per row, conditioned prompts), lambda_training.py (the listwise run's scheduler,
conditioner and state as one object; a null version for pairwise losses), evaluation.py (evaluation passes),
checkpoint.py (save/restore through Ray Train), checkpoint_files.py (completion records, the newest complete
checkpoint, file checks), safe_state.py (RNG as safetensors, DeepSpeed files loaded weights-only), metrics.py
(cross-rank reduction, logs), export.py (HF folder).
"""
