"""The Mallows bandit: why the dispersion index matters, in seconds on a CPU (ALGORITHMS.md sections 1, 2, 2.1, 2.2).

Contexts x = 0..C-1 with known dispersions phi(x) and A arms with known rewards r(x, a); preference pairs drawn
from the Mallows-Kendall model of each context; a tabular softmax policy trained on them with DPO or MallowsPO;
each trained policy placed on the reward-KL plane against the optimal frontier. DPO tilts concentrated contexts
harder than dispersed ones, off the frontier when contexts are equally valuable; MallowsPO divides the dispersion
out. Every number is a key of `config.BanditConfig`.

An application on top of the library (it reads `mallows_ray.losses` and `mallows_ray.typed_config`); its modules, each
importing only the ones listed before it:

    config.py    BanditConfig (typed, checked by mallows_ray.typed_config) and the METHODS table
    problem.py   the Mallows-Kendall sampler, rewards, reference, preference pairs, policy value, the frontier
    training.py  full-batch training of one policy; run_trial / run_experiment over the method x beta grid
    summary.py   gap to the frontier, reward at matched KL, tables, CSV / markdown / JSON / PNG outputs
    sweep.py     the same grid as a Ray Tune sweep, one trial per point (Ray imported on call)
    cli.py       `mallows-ray bandit` (or `python -m mallows_ray.bandit.cli`)
"""
