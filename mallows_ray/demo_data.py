"""The bundled demo data (mallows_ray/resources/demo): where it lives, and its listwise records as pairs.

The files are written by `jobs/build_demo_data.py` (see resources/demo/README.md): one JSON object per line,
`{"id", "prompt", "responses": [4 texts], "scores": {objective: [4 floats]}}`, the `listwise` format, with
the objectives of `mallows_ray.judges.OBJECTIVES`. Pairwise losses need one chosen/rejected pair per prompt;
`to_pair` derives it under a weight vector over the objectives, so one listwise file serves every lambda.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mallows_ray.judges import OBJECTIVES
from mallows_ray.lambdas import LambdaLike, lambda_vector

DEMO_DIR = Path(__file__).resolve().parent / "resources" / "demo"
SPLITS = ("train", "validation", "test")


def demo_path(split: str) -> Path:
    """The bundled demo file of `split` (one of SPLITS)."""
    if split not in SPLITS:
        raise ValueError(f"demo split {split!r} does not exist; choose one of {', '.join(SPLITS)}")
    return DEMO_DIR / f"{split}.jsonl.gz"


def weighted_scores(record: dict[str, Any], weights: LambdaLike,
                    objectives: tuple[str, ...] = OBJECTIVES) -> list[float]:
    """sum_k w_k * scores[objective_k][i] for every response i of a listwise record.

    `weights`: anything `lambdas.lambda_vector` takes ("format=0.5,positivity=0.5", a mapping, or K numbers
    in `objectives` order), non-negative and summing to 1.
    """
    w = lambda_vector(weights, objectives)
    scores = record["scores"]
    missing = [name for name, weight in zip(objectives, w) if weight > 0 and name not in scores]
    if missing:
        raise KeyError(f"record {record.get('id')!r} has no scores for {missing}; it has {sorted(scores)}")
    n = len(record["responses"])
    return [sum(weight * scores[name][i] for name, weight in zip(objectives, w) if weight > 0) for i in range(n)]


def to_pair(record: dict[str, Any], weights: LambdaLike,
            objectives: tuple[str, ...] = OBJECTIVES) -> dict[str, Any] | None:
    """A listwise record -> a `pairwise_text` record `{"id", "prompt", "chosen", "rejected"}` under `weights`:
    chosen is the response with the best weighted score (the first on ties), rejected the one with the worst
    (the last on ties). None when every response has the same weighted score: there is nothing to prefer.
    """
    totals = weighted_scores(record, weights, objectives)
    best = max(range(len(totals)), key=lambda i: (totals[i], -i))
    worst = min(range(len(totals)), key=lambda i: (totals[i], -i))
    if totals[best] == totals[worst]:
        return None
    responses = record["responses"]
    return {"id": record["id"], "prompt": record["prompt"], "chosen": responses[best], "rejected": responses[worst]}
