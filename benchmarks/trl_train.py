"""The held-out results' TRL side: `trl.DPOTrainer` (default mode) trains on the same pairs and saves an HF folder.

    python -m benchmarks.trl_train --pairs train_trl.jsonl --output runs/trl/export [--lr ... --beta ...]

`--pairs` holds conversational rows (`prompt` messages, `chosen`/`rejected` assistant turns), written by
`benchmarks/results.py` from the same untruncated HH pairs that `mallows-ray train` reads; the settings that
must match mallows_ray's (beta, lr, linear schedule, warm-up, global batch, one epoch, max_length, fp32, clipping)
are flags. Gradient checkpointing off on both sides (TRL's default is on). The folder is then evaluated by
`mallows-ray eval`, exactly like mallows_ray's own exports. Prints one JSON line: wall seconds, steps, final loss.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import emit, model_path, peak_rss_mib, quiet_libraries, set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=Path, required=True, help="JSONL of conversational prompt/chosen/rejected rows")
    parser.add_argument("--output", type=Path, required=True, help="folder of the saved model and tokenizer")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--micro-batch", type=int, default=4, help="pairs per forward")
    parser.add_argument("--gradient-accumulation", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=192, help="prompt + response tokens")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quiet_libraries()
    set_threads(args.threads)

    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from mallows_ray.models import load_model, load_tokenizer

    rows = [json.loads(line) for line in args.pairs.read_text().splitlines() if line.strip()]
    path = model_path()
    started = time.perf_counter()  # model load, tokenization, training and saving, as a TRL user waits for them
    tokenizer = load_tokenizer(path)
    with tempfile.TemporaryDirectory(prefix="trl_train_") as out_dir:
        config = DPOConfig(
            output_dir=out_dir, per_device_train_batch_size=args.micro_batch,
            gradient_accumulation_steps=args.gradient_accumulation, num_train_epochs=1, learning_rate=args.lr,
            lr_scheduler_type="linear", warmup_steps=args.warmup_steps, max_grad_norm=args.max_grad_norm,
            beta=args.beta, max_length=args.max_length, use_cpu=True, bf16=False, fp16=False,
            gradient_checkpointing=False, report_to=[], logging_strategy="no", save_strategy="no",
            eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=args.seed,
        )
        trainer = DPOTrainer(model=load_model(path, torch.float32), args=config, processing_class=tokenizer,
                             train_dataset=Dataset.from_list(rows))
        output = trainer.train()
        trainer.save_model(str(args.output))  # model.safetensors + config + tokenizer (processing_class)
    emit({"framework": "trl", "rows": len(rows), "steps": output.global_step, "mean_train_loss": output.training_loss,
          "seconds": time.perf_counter() - started, "peak_rss_mib": peak_rss_mib()})


if __name__ == "__main__":
    main()
