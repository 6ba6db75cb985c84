"""Small learnable preference sets and config helpers shared by the integration tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from mallows_ray.config import Config, load_config

WORDS = ["apple", "river", "stone", "cloud", "green", "paper", "light", "music"]


def yes_no_pairs(count: int, offset: int) -> Iterable[dict[str, str]]:
    """Every chosen response starts with "yes", every rejected one with "no"; lengths vary, so length grouping
    and padding are exercised."""
    for i in range(offset, offset + count):
        word = WORDS[i % len(WORDS)]
        yield {"id": f"q{i:03d}", "prompt": f"Is {word} number {i} good?",
               "chosen": f"yes, {word} is fine" + "!" * (i % 5), "rejected": f"no, {word} is bad" + "." * (i % 7)}


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def config_from(items: dict[str, Any]) -> Config:
    """A validated config from {dotted key: value} overrides on the defaults."""
    return load_config(None, [f"{key}={value}" for key, value in items.items()])


def prepare_config(cache_dir: Path, model_dir: Path, train: Path, **overrides: Any) -> Config:
    """A config that prepares `train` with the model in `model_dir` into `cache_dir`, plus {dotted key: value}."""
    return config_from({"model.name_or_path": str(model_dir), "data.train": str(train),
                        "data.cache_dir": str(cache_dir), **overrides})
