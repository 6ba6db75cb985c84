"""Lambda-control statistics: bootstrap intervals, the matrix, paired differences and the control verdict."""

import numpy as np
import pytest

from mallows_ray.demo.control import control_differences, control_matrix, controlled, interval


def test_interval_brackets_the_mean_and_narrows_with_more_prompts():
    rng = np.random.default_rng(1)
    small, large = rng.normal(0.5, 0.2, 16), rng.normal(0.5, 0.2, 256)
    a, b = interval(small), interval(large)
    assert a["lo"] < a["mean"] < a["hi"] and a["mean"] == pytest.approx(small.mean())
    assert (b["hi"] - b["lo"]) < (a["hi"] - a["lo"]) / 2  # ~1/sqrt(16) as wide
    assert interval(small) == a  # seeded: reproducible
    assert interval([0.3] * 5) == {"mean": 0.3, "lo": pytest.approx(0.3), "hi": pytest.approx(0.3)}
    with pytest.raises(ValueError, match="non-empty"):
        interval([])


def test_pairing_detects_a_small_shift_that_unpaired_intervals_would_hide():
    rng = np.random.default_rng(2)
    base = rng.uniform(0, 1, 64)  # prompts differ a lot; the vertex adds 0.05 on every prompt
    scores = {"short": {"short": list(base + 0.05), "warm": list(rng.uniform(0, 1, 64))},
              "warm": {"short": list(base), "warm": list(rng.uniform(0, 1, 64))}}
    matrix = control_matrix(scores)
    assert matrix["short"]["short"]["lo"] < matrix["warm"]["short"]["hi"]  # unpaired intervals overlap
    differences = control_differences(scores, ["short", "warm"])
    assert differences["short"]["warm"]["mean"] == pytest.approx(0.05)
    assert differences["short"]["warm"]["lo"] == pytest.approx(0.05)  # paired: the difference is exact
    assert set(differences) == {"short", "warm"} and set(differences["warm"]) == {"short"}


def test_controlled_needs_every_other_vertex_beaten():
    up, straddle = {"mean": 0.1, "lo": 0.02, "hi": 0.2}, {"mean": 0.05, "lo": -0.01, "hi": 0.1}
    assert controlled({"a": {"b": up, "c": up}, "b": {"a": up, "c": straddle}}) == {"a": True, "b": False}
    with pytest.raises(ValueError, match="one score per prompt"):
        control_matrix({"a": {"a": [1.0, 2.0], "b": [1.0]}})
