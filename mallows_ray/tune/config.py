"""The sweep YAML: its `sweep:` section (SweepSettings, SchedulerSettings), the search space (Dimension),
and `load_sweep_config`, which checks the section, the base training config and every swept key and value
against the training config before anything runs; an error names the key (`sweep.space.loss.beta=...`).
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from mallows_ray.config import Config, changes_scored_data
from mallows_ray.typed_config import ConfigError, apply_override, bounded, from_dict, read_yaml_file, set_key, to_dict

SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
_PER_TRIAL_KEYS = ("run", "run.name", "run.storage_path")  # set by the sweep for every trial


class SweepError(RuntimeError):
    """A sweep cannot run or finish as configured; the message says what to change."""


@dataclass
class SchedulerSettings:
    """ASHA (asynchronous successive halving): at each rung (grace_period x reduction_factor^k of `time_attr`)
    a trial whose metric is in the worse 1 - 1/reduction_factor of those that reached the rung stops."""

    name: Literal["asha"] = "asha"
    time_attr: str = "step"  # optimizer steps of the trial's reports; Tune's own: training_iteration
    grace_period: int = bounded(1, 1)
    reduction_factor: float = bounded(2.0, 1.01)
    max_t: int = bounded(100, 1)  # the last rung's horizon; trials are never cut at max_t itself


@dataclass
class SweepSettings:
    name: str = "sweep"
    storage_path: str = "~/mallows_ray_sweeps"  # a local folder; on a multi-node cluster a shared mount (NFS)
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = bounded(1, 1)
    seed: int = 0  # random and optuna sampling
    metric: str = "eval/loss"
    mode: Literal["min", "max"] = "min"
    scheduler: SchedulerSettings | None = None  # None: every trial runs to its end
    max_concurrent_trials: int | None = None  # None: as many as the cluster's CPUs/GPUs hold
    space: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Dimension:
    """One swept key: `values` are the listed values (grid, choice) or the bounds (uniform, loguniform, randint)."""

    key: str
    kind: str
    values: tuple

    @property
    def discrete(self) -> bool:
        return self.kind in ("grid", "choice")

    @property
    def affects_preparation(self) -> bool:
        """Whether the key changes the scored data: swept only over listed values, each prepared once."""
        return changes_scored_data(self.key)

    def tune_domain(self) -> Any:
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return getattr(tune, self.kind)(*self.values)  # uniform, loguniform, randint (high exclusive)


@dataclass(frozen=True)
class SweepConfig:
    settings: SweepSettings
    space: tuple[Dimension, ...]
    base: dict[str, Any]  # the training config sections as written; every trial applies its values on top

    @property
    def storage(self) -> Path:
        return Path(os.path.abspath(os.path.expanduser(self.settings.storage_path)))

    @property
    def experiment_dir(self) -> Path:
        """<storage_path>/<name>: Tune's experiment folder, the trials' runs and the results."""
        return self.storage / self.settings.name

    def to_mapping(self) -> dict[str, Any]:
        """The whole sweep YAML, as `load_sweep_config` reads it back."""
        return {"sweep": to_dict(self.settings), **copy.deepcopy(self.base)}

    def trial_data(self, values: dict[str, Any]) -> dict[str, Any]:
        """The base config with one trial's values applied (plain data, not yet validated)."""
        data = copy.deepcopy(self.base)
        for key, value in values.items():
            set_key(data, key, copy.deepcopy(value))
        return data


def _parse_dimension(key: str, spec: Any) -> Dimension:
    where = f"sweep.space.{key}"
    forms = "{grid: [v1, v2]}, {choice: [v1, v2]}, {uniform: [low, high]}, {loguniform: [low, high]}, " \
            "{randint: [low, high]} (high exclusive)"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
        raise ConfigError(f"{where}: {spec!r} is not a search dimension; expected one of {forms}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {kind} takes a non-empty list, got {values!r}")
    if kind in ("grid", "choice"):
        return Dimension(key, kind, tuple(values))
    number = int if kind == "randint" else (int, float)
    if len(values) != 2 or not all(isinstance(v, number) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}: {kind} takes [low, high] {'integers' if kind == 'randint' else 'numbers'}, "
                          f"got {values!r}")
    low, high = values
    if not low < high or (kind == "loguniform" and low <= 0):
        raise ConfigError(f"{where}: {kind} bounds {values!r} need low < high{' and low > 0' * (kind == 'loguniform')}")
    return Dimension(key, kind, (low, high))


def _check_dimension(dim: Dimension, search: str) -> None:
    where = f"sweep.space.{dim.key}"
    if dim.key in _PER_TRIAL_KEYS:
        raise ConfigError(f"{where}: the sweep sets run.name and run.storage_path for every trial; "
                          "they cannot be swept")
    if search == "grid" and dim.kind != "grid":
        raise ConfigError(f"{where}: search: grid takes only {{grid: [...]}} dimensions, got {dim.kind}; "
                          "use search: random (or optuna) to sample")
    if search == "optuna" and dim.kind == "grid":
        raise ConfigError(f"{where}: optuna samples its trials and takes no grid; use {{choice: [...]}}")
    if dim.affects_preparation and not dim.discrete:
        raise ConfigError(f"{where}: this key changes the scored data, which is prepared once per value before the "
                          f"trials start; list its values with grid or choice instead of {dim.kind}")


def sample_configs(sweep: SweepConfig, limit: int = 4096) -> Iterator[tuple[dict[str, Any], Config]]:
    """(values, validated Config) for the trial configs worth checking before anything runs: every combination
    of the listed values and range bounds when there are at most `limit`, else each dimension on its own."""
    dims = sweep.space
    if math.prod(len(d.values) for d in dims) <= limit:  # values: the listed ones, or a range's two bounds
        combos = (dict(zip([d.key for d in dims], values)) for values in itertools.product(*(d.values for d in dims)))
    else:
        combos = ({d.key: v} for d in dims for v in d.values)
    for values in combos:
        try:
            yield values, from_dict(Config, sweep.trial_data(values))
        except ConfigError as err:
            where = ", ".join(f"sweep.space.{k}={v!r}" for k, v in values.items())
            raise ConfigError(f"{where}: {err}") from None


def load_sweep_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """Read a sweep YAML, apply `section.key=value` overrides (`sweep.num_samples=8` or `loss.beta=0.2`), and
    validate the sweep section, the base training config, and every swept key and value against the training
    config: an unknown key or a bad value raises `ConfigError` naming it."""
    data = read_yaml_file(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    for override in overrides:
        apply_override(data, override)
    if not isinstance(data.get("sweep"), dict):
        raise ConfigError(f"{path}: no `sweep:` section; a sweep YAML is a training config plus a sweep section "
                          "(name, search, metric, mode, scheduler, space)")
    settings = from_dict(SweepSettings, data.pop("sweep"), "sweep")
    if not settings.space:
        raise ConfigError("sweep.space: empty; give at least one dotted config key, e.g. loss.beta: {grid: [0.1, 0.5]}")
    if settings.search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError("sweep.search: optuna needs the optuna package: pip install 'mallows-ray[optuna]'")
    if settings.scheduler and settings.scheduler.grace_period > settings.scheduler.max_t:
        raise ConfigError(f"sweep.scheduler: grace_period {settings.scheduler.grace_period} exceeds max_t "
                          f"{settings.scheduler.max_t}")
    if "://" in settings.storage_path:
        raise ConfigError(f"sweep.storage_path: {settings.storage_path!r}: sweeps write to a local folder or a shared "
                          "mount (NFS) that every node sees; object-store URIs are not supported yet")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", settings.name):
        raise ConfigError(f"sweep.name: {settings.name!r} names a folder; use letters, digits, '.', '_', '-'")
    from_dict(Config, data)  # the base alone: its errors name the key without a sweep value in the way
    space = tuple(_parse_dimension(str(key), spec) for key, spec in settings.space.items())
    for dim in space:
        _check_dimension(dim, settings.search)
    sweep = SweepConfig(settings, space, data)
    for _ in sample_configs(sweep):
        pass
    return sweep


def expected_trials(sweep: SweepConfig) -> int:
    """Trials of the whole sweep: num_samples, each a full pass over the grid dimensions when there are any."""
    return sweep.settings.num_samples * math.prod(len(d.values) for d in sweep.space if d.kind == "grid")
