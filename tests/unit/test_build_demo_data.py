"""jobs/build_demo_data.py's style rules (the script itself needs the embedded model and minutes of CPU), and
the bundled data they made: each style's reply stands out on its own judge."""

import gzip
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

from mallows_ray.demo.data import demo_path
from mallows_ray.demo.judges import OBJECTIVES

SCRIPT = Path(__file__).resolve().parents[2] / "jobs" / "build_demo_data.py"


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("build_demo_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_first_sentence_cuts_at_the_first_sentence_end(build):
    assert build.first_sentence("Use a map. Then walk on.") == "Use a map."
    assert build.first_sentence("Version 2.5 works! Really") == "Version 2.5 works!"  # a decimal point is no end
    assert build.first_sentence("no end here") == "no end here"
    assert build.first_sentence("Steps:\n\n1. Boil water. Then") == "Steps:\n\n1. Boil water."  # a list number


def test_a_style_keeps_only_replies_that_fit_it(build):
    short, formatted, warm, plain = build.STYLES
    assert short.fits("Use a map and water.")
    assert not short.fits("Here is a guide: 1.")       # no sentence end: a list was about to start
    assert not short.fits("- Use a map and water.")    # a list item, not prose
    assert not short.fits("Use a map.")                # under 4 words
    assert not short.fits("Use a map and water")       # cut off
    assert formatted.fits("1. Boil water\n2. Steep")
    assert not formatted.fits("1. 1. Boil water\n2. 2. Steep")  # two list markers open a line
    assert not formatted.fits("- 1. Help\n- 2. Love")
    assert not warm.fits("Great question! Be warm and cheerful, using happy words.")  # echoes its instruction
    assert warm.fits("Great question! Tea is lovely with honey and friends.")
    assert plain.fits("anything at all") and not plain.fits("  ")


def test_styles_open_and_finish_by_format_request(build):
    short, formatted, warm, plain = build.STYLES
    assert [s.name for s in build.STYLES] == ["short", "format", "warm", "plain"]
    assert formatted.opening_for("bullets") == "- " and formatted.opening_for("one_sentence") == ""
    assert warm.opening_for("json") == warm.opening_for("bullets") == "Great question! "
    assert formatted.finished("keep calm", "all_caps") == "KEEP CALM"
    assert formatted.finished("keep calm", "json") == "keep calm"
    assert short.finished("One. Two.", "bullets") == "One." and plain.finished("One. Two.", "bullets") == "One. Two."


def test_bundled_data_has_each_style_best_on_its_own_judge():
    """Reply i comes from style i; the aimed-at style has the highest mean score on its judge, by a margin."""
    with gzip.open(demo_path("train"), "rt") as fh:
        records = [json.loads(line) for line in fh]
    aimed = dict(zip(OBJECTIVES, (0, 1, 2)))  # conciseness <- short, format <- format, positivity <- warm
    for objective, style in aimed.items():
        means = [statistics.fmean(r["scores"][objective][i] for r in records) for i in range(4)]
        assert means[style] > max(m for i, m in enumerate(means) if i != style) + 0.05, (objective, means)
    assert sum(r["responses"][2].startswith("Great question!") for r in records) == len(records)


def test_bundled_short_and_warm_replies_fit_their_styles(build):
    """Every short reply is one whole prose sentence and no warm reply quotes its instruction (session 27's data
    had "1." as a short reply and "Be warm and cheerful" inside warm ones)."""
    records = []
    for split in ("train", "validation", "test"):
        with gzip.open(demo_path(split), "rt") as fh:
            records += [json.loads(line) for line in fh]
    short, _, warm, _ = build.STYLES
    assert [r["responses"][0] for r in records if not short.fits(r["responses"][0])] == []
    assert [r["responses"][2] for r in records if not warm.fits(r["responses"][2])] == []
