"""Job entry point for `mallows-ray train`: DeepSpeed on Ray Train workers (the data is prepared first if
needed), checkpoints under run.storage_path, an HF export at the end.

Submit from the repository root; the driver joins the cluster through $RAY_ADDRESS, which the job server sets:

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --config jobs/configs/NAME.yaml [section.key=value ...]

Arguments are those of `mallows-ray train --help`.
"""

import sys

from mallows_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
