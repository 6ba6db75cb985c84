"""Job entry point for `mallows-ray eval`: loss and reward metrics of an exported policy on the config's data.

Submit from the repository root; the driver joins the cluster through $RAY_ADDRESS, which the job server sets:

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/eval.py --config jobs/configs/NAME.yaml --model EXPORT_FOLDER [section.key=value ...]

Arguments are those of `mallows-ray eval --help`.
"""

import sys

from mallows_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
