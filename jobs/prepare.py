"""Job entry point for `mallows-ray prepare`: validate, tokenize and reference-score the data into the
cache under data.cache_dir (shared storage on a multi-node cluster).

Submit from the repository root; the driver joins the cluster through $RAY_ADDRESS, which the job server sets:

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/prepare.py --config jobs/configs/NAME.yaml [section.key=value ...]

Arguments are those of `mallows-ray prepare --help`.
"""

import sys

from mallows_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
