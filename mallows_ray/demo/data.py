"""The bundled demo resources (demo/resources/): where they live, and subsets of the listwise demo splits.

    resources/listwise/  the demo data, written by `jobs/build_demo_data.py` (see its README.md): one JSON
                         object per line, `{"id", "prompt", "responses": [4 texts], "scores": {objective: [4
                         floats]}}`, the `listwise` format, with the objectives of `judges.OBJECTIVES`;
                         splits train, validation and test, each already shuffled
    resources/config.yaml  the `mallows-ray demo` training config (run.py adds the data subsets, run folder)
    resources/pairs.jsonl  24 hand-written chosen/rejected pairs (`pairwise_text`) for the example
                           configs of jobs/configs
"""

from __future__ import annotations

import gzip
from pathlib import Path

RESOURCES = Path(__file__).resolve().parent / "resources"
DEMO_DIR = RESOURCES / "listwise"
DEMO_CONFIG = RESOURCES / "config.yaml"
SPLITS = ("train", "validation", "test")


def demo_path(split: str) -> Path:
    """The bundled demo file of `split` (one of SPLITS)."""
    if split not in SPLITS:
        raise ValueError(f"demo split {split!r} does not exist; choose one of {', '.join(SPLITS)}")
    return DEMO_DIR / f"{split}.jsonl.gz"


def demo_subset(split: str, rows: int, folder: Path) -> Path:
    """The first `rows` records of a bundled demo split as a jsonl file (the splits are already shuffled)."""
    with gzip.open(demo_path(split), "rt") as fh:
        lines = [line for line in fh if line.strip()][:rows]
    path = folder / f"{split}-{len(lines)}.jsonl"
    path.write_text("".join(lines))
    return path


def split_size(split: str) -> int:
    """Records in a bundled demo split."""
    with gzip.open(demo_path(split), "rt") as fh:
        return sum(1 for line in fh if line.strip())
