"""benchmarks/sections.py: each command rewrites only its own block of RESULTS.md."""

from benchmarks.results import last_json, standard_error
from benchmarks.sections import get_section, replace_section, section_names


def test_replace_section_appends_then_replaces_in_place_keeping_the_rest():
    doc = "# Results\n\nspeed rows\n"
    once = replace_section(doc, "heldout", "table v1")
    assert once.startswith("# Results\n\nspeed rows\n\n<!-- heldout:start -->\ntable v1\n<!-- heldout:end -->")
    twice = replace_section(once + "\ntrailer\n", "heldout", "table v2")
    assert get_section(twice, "heldout") == "table v2"
    assert "table v1" not in twice and twice.endswith("\ntrailer\n") and twice.count("heldout:start") == 1


def test_section_names_lists_every_section_in_order_whatever_its_name():
    doc = replace_section(replace_section("# Results\n", "heldout", "t"), "scale-pool", "s")
    assert section_names(doc) == ["heldout", "scale-pool"]  # a renamed section too: run.py keeps them all
    assert section_names("no markers here") == []


def test_get_section_is_none_without_markers():
    assert get_section("no markers here", "heldout") is None


def test_last_json_finds_the_cli_result_after_other_output():
    out = 'INFO {not json\n{"a": 1}\nchatter\n{\n  "pairwise": {"rewards/accuracy": 0.5}\n}\n'
    assert last_json(out) == {"pairwise": {"rewards/accuracy": 0.5}}


def test_standard_error_is_the_binomial_one():
    assert abs(standard_error(0.5, 100) - 0.05) < 1e-12
    assert standard_error(1.0, 10) == 0.0
