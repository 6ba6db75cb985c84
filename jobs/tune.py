"""Job entry point for `mallows-ray tune` (mallows_ray/tune/): a Ray Tune sweep over training (a config with a
top-level `sweep` section).

Submit from the repository root; the driver joins the cluster through $RAY_ADDRESS, which the job server sets:

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/tune.py --config jobs/configs/SWEEP.yaml [section.key=value ...]

Arguments are those of `mallows-ray tune --help`.
"""

import sys

from mallows_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
