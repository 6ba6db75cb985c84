"""Drivers: what runs in the process that starts the work, above the workers' `train/` package.

    train.py      `mallows-ray train`: scored data, the TrainPlan, the Ray Train TorchTrainer, the result
    evaluate.py   `mallows-ray eval`: an export on a split, in one process
    generate.py   `mallows-ray generate`: lambda-conditioned replies from an export
    run_dir.py    run folders: claimed before training, the only thing the program deletes
"""
