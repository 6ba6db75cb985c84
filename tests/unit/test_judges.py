"""The demo judges on hand-checked replies, and listwise records turned into pairs under a weight vector."""

from __future__ import annotations

import math
from typing import Any

import pytest

from mallows_ray.demo.judges import (
    FORMAT_PHRASES,
    OBJECTIVES,
    FormatRequest,
    conciseness,
    format_following,
    looks_unfinished,
    parse_format_request,
    positivity,
    score_all,
)
from mallows_ray.lambdas.vectors import LambdaLike, lambda_vector


def test_objectives_are_sorted_like_the_pipeline_default():
    assert OBJECTIVES == ("conciseness", "format", "positivity") == tuple(sorted(OBJECTIVES))


# ---- conciseness


def test_conciseness_is_scale_over_scale_plus_words():
    assert conciseness("", "Yes.") == pytest.approx(30 / 31)
    assert conciseness("", " ".join(["word"] * 29) + " end.") == pytest.approx(0.5)
    assert conciseness("", " ".join(["word"] * 89) + " end.") == pytest.approx(0.25)


def test_conciseness_gives_nothing_for_empty_and_halves_cut_off_replies():
    assert conciseness("", "") == 0.0
    assert conciseness("", "  \n ") == 0.0
    assert conciseness("", "The sky is blue because") == pytest.approx(0.5 * 30 / 35)
    assert conciseness("", "The sky is blue.") == pytest.approx(30 / 34)


@pytest.mark.parametrize("reply, cut", [
    ("Boil the water.", False), ('He said "go."', False), ("- apples\n- pears", False), ("1. Boil\n2. Pour", False),
    ('{"answer": "yes"}', False), ("Boil the water and then", True), ("Here are the steps:", True),
    ("- apples,", True), ("", False),
])
def test_looks_unfinished(reply, cut):
    assert looks_unfinished(reply) is cut


# ---- positivity


def test_positivity_counts_lexicon_words_per_word():
    assert positivity("", "The box is on the table.") == 0.5
    assert positivity("", "") == 0.5
    # net +1 in 4 words: 0.5 + 0.5 tanh(10 / 4)
    assert positivity("", "This is a great") == pytest.approx(0.5 + 0.5 * math.tanh(2.5))
    # happy, glad (+2) and sorry (-1) in 5 words
    assert positivity("", "Happy to help, sorry, glad") == pytest.approx(0.5 + 0.5 * math.tanh(10 / 5))


def test_positivity_flips_a_negated_word():
    # "not good": -1 over 4 words; "don't worry": +1 over 2 words; "never" alone is negative
    assert positivity("", "That is not good") == pytest.approx(0.5 + 0.5 * math.tanh(-10 / 4))
    assert positivity("", "Don't worry") == pytest.approx(0.5 + 0.5 * math.tanh(10 / 2))
    assert positivity("", "I never said that") == pytest.approx(0.5 + 0.5 * math.tanh(-10 / 4))
    assert positivity("", "Thanks, that is wonderful!") > 0.9 > 0.1 > positivity("", "That is a terrible, awful idea.")


# ---- format requests and checks


@pytest.mark.parametrize("kind", sorted(FORMAT_PHRASES))
def test_every_phrase_parses_as_its_format(kind):
    for phrase in FORMAT_PHRASES[kind]:
        request = parse_format_request("How do I make tea? " + phrase.format(n=3))
        assert request == FormatRequest(kind, 3 if kind == "numbered_steps" else None)


def test_parse_format_request_variants_and_absence():
    assert parse_format_request("List four numbered steps for boiling an egg.") == FormatRequest("numbered_steps", 4)
    assert parse_format_request("How do I boil an egg?") is None
    with pytest.raises(ValueError, match="how many"):
        parse_format_request("Answer as a numbered list.")
    with pytest.raises(ValueError, match="no known format"):
        format_following("How do I boil an egg?", "Boil it.")


BULLETS = "Answer as a bulleted list, one point per line starting with '-'."


@pytest.mark.parametrize("prompt, reply, expected", [
    (BULLETS, "- tea\n- milk\n- sugar", 1.0),
    (BULLETS, "You need:\n- tea\n- milk\n- sugar", 0.75),
    (BULLETS, "- tea only", 0.0),
    (BULLETS, "Tea, milk and sugar.", 0.0),
    ("Answer in a single sentence.", "Tea is brewed from leaves.", 1.0),
    ("Answer in a single sentence.", "Tea is good. Boil water! Pour it?", 1 / 3),
    ("Answer in a single sentence.", "Boil water\nPour it", 0.5),
    ("Give exactly 3 numbered steps.", "1. Boil.\n2. Steep.\n3. Pour.", 1.0),
    ("Give exactly 3 numbered steps.", "1) Boil.\n2) Pour.", pytest.approx(2 / 3)),
    ("Give exactly 3 numbered steps.", "1. a\n2. b\n3. c\n4. d\n5. e\n6. f\n7. g", 0.0),
    ("Give exactly 3 numbered steps.", "Boil, steep, pour.", 0.0),
    ("Write your whole answer in ALL CAPS.", "YES, ALWAYS.", 1.0),
    ("Write your whole answer in ALL CAPS.", "Yes", pytest.approx(1 / 3)),
    ("Write your whole answer in ALL CAPS.", "42!", 0.0),
    ("Give your answer as a JSON object.", '{"answer": "green tea"}', 1.0),
    ("Give your answer as a JSON object.", '```json\n{"answer": "green tea"}\n```', 1.0),
    ("Give your answer as a JSON object.", 'Sure! {"answer": "green tea"} Enjoy.', 0.5),
    ("Give your answer as a JSON object.", '["green tea"]', 0.0),
    ("Give your answer as a JSON object.", '{"answer": "green tea"', 0.0),
])
def test_format_checks(prompt, reply, expected):
    assert format_following(prompt, reply) == expected


# ---- all three together: the objectives can disagree


def test_score_all_in_objective_order_and_in_range():
    scores = score_all("Reply with exactly one sentence.", "Sure, tea is lovely.")
    assert list(scores) == list(OBJECTIVES)
    assert all(0.0 <= v <= 1.0 for v in scores.values())


def test_the_concise_reply_loses_on_format_and_positivity():
    prompt = "How do I make tea? Give exactly 3 numbered steps."
    terse = "Boil water, add tea."
    steps = "Happy to help!\n1. Boil fresh water.\n2. Steep the tea for three minutes.\n3. Pour and enjoy!"
    a, b = score_all(prompt, terse), score_all(prompt, steps)
    assert a["conciseness"] > b["conciseness"]
    assert a["format"] < b["format"] and a["positivity"] < b["positivity"]


def test_the_polite_reply_loses_on_format_and_conciseness():
    prompt = "Is tea healthy? Write your whole answer in ALL CAPS."
    caps = "YES, IN MODERATION."
    polite = "Great question! Tea is a lovely, healthy drink and I hope you enjoy it."
    a, b = score_all(prompt, caps), score_all(prompt, polite)
    assert a["format"] > b["format"] and a["conciseness"] > b["conciseness"]
    assert a["positivity"] < b["positivity"]


# ---- listwise record -> pair under a weight vector (a test helper: no production code derives pairs)


def weighted_scores(record: dict[str, Any], weights: LambdaLike,
                    objectives: tuple[str, ...] = OBJECTIVES) -> list[float]:
    """sum_k w_k * scores[objective_k][i] for every response i of a listwise record; `weights`: anything
    `lambda_vector` takes, non-negative and summing to 1."""
    w = lambda_vector(weights, objectives)
    scores = record["scores"]
    missing = [name for name, weight in zip(objectives, w) if weight > 0 and name not in scores]
    if missing:
        raise KeyError(f"record {record.get('id')!r} has no scores for {missing}; it has {sorted(scores)}")
    n = len(record["responses"])
    return [sum(weight * scores[name][i] for name, weight in zip(objectives, w) if weight > 0) for i in range(n)]


def to_pair(record: dict[str, Any], weights: LambdaLike,
            objectives: tuple[str, ...] = OBJECTIVES) -> dict[str, Any] | None:
    """A listwise record -> `{"id", "prompt", "chosen", "rejected"}` under `weights`: chosen the best weighted
    score (the first on ties), rejected the worst (the last on ties); None when all tie."""
    totals = weighted_scores(record, weights, objectives)
    best = max(range(len(totals)), key=lambda i: (totals[i], -i))
    worst = min(range(len(totals)), key=lambda i: (totals[i], -i))
    if totals[best] == totals[worst]:
        return None
    responses = record["responses"]
    return {"id": record["id"], "prompt": record["prompt"], "chosen": responses[best], "rejected": responses[worst]}

RECORD = {
    "id": "demo-0001", "prompt": "p",
    "responses": ["short", "formatted", "polite", "bad"],
    "scores": {"conciseness": [0.9, 0.4, 0.5, 0.1], "format": [0.0, 1.0, 0.2, 0.0],
               "positivity": [0.5, 0.5, 1.0, 0.2]},
}


@pytest.mark.parametrize("weights, chosen", [
    ("conciseness=1", "short"), ("format=1", "formatted"), ({"positivity": 1.0}, "polite"),
    ([0.2, 0.3, 0.5], "polite"),  # 0.18+0+0.25 | 0.08+0.3+0.25 | 0.1+0.06+0.5 | 0.02+0+0.1
])
def test_to_pair_picks_the_best_and_worst_weighted_reply(weights, chosen):
    pair = to_pair(RECORD, weights)
    assert pair == {"id": "demo-0001", "prompt": "p", "chosen": chosen, "rejected": "bad"}


def test_weighted_scores_and_ties():
    assert weighted_scores(RECORD, [0.2, 0.3, 0.5]) == pytest.approx([0.43, 0.63, 0.66, 0.12])
    tied = {**RECORD, "scores": {"conciseness": [0.5, 0.5, 0.5, 0.5], "format": [1, 0, 0, 1], "positivity": [0] * 4}}
    assert to_pair(tied, "conciseness=1") is None  # nothing to prefer
    # ties on the best go to the first reply, ties on the worst to the last
    assert to_pair(tied, "format=1") == {"id": "demo-0001", "prompt": "p", "chosen": "short", "rejected": "polite"}


def test_weights_are_checked():
    with pytest.raises(ValueError):
        to_pair(RECORD, [0.5, 0.5, 0.5])  # does not sum to 1
    with pytest.raises(KeyError, match="helpfulness"):
        to_pair(RECORD, "helpfulness=1", objectives=("helpfulness",))
