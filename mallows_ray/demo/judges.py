"""Three transparent programmatic judges for the demo: conciseness, positivity and format.

Each judge is a pure function `judge(prompt, response) -> float in [0, 1]` (higher is better) whose rule
fits in its docstring, so a reader can check any score by hand. They are chosen to pull in different
directions, which is what makes the demo's multi-objective data interesting:

    conciseness  short, finished replies win        -> penalises polite preambles and long lists
    positivity   warm, polite wording wins           -> rewards "Great question! I'd be happy to help..."
    format       following the requested format wins -> a 5-step list is long, JSON and ALL CAPS are terse

`score_all(prompt, response)` returns all three in `OBJECTIVES` order. The format judge reads the request
from the prompt text: every demo prompt ends with one of the phrasings in `FORMAT_PHRASES`
(`parse_format_request` recognises these and close variants).

Pure python (re, json, math): nothing here imports torch, ray or transformers.
"""

from __future__ import annotations

import json
import math
import re
from typing import Callable, NamedTuple

# ---------------------------------------------------------------------------------------------- conciseness

CONCISENESS_SCALE_WORDS = 30  # a reply of this many words scores 0.5
UNFINISHED_FACTOR = 0.5  # a reply that stops mid-sentence keeps half its score: brevity by truncation is no merit
_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")
_LIST_ITEM = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+\S")
_FINISHED_ENDINGS = tuple(".!?)]}\"'`\u201d\u2019")


def words(text: str) -> list[str]:
    """The lower-cased words of `text` (letters/digits, with one inner apostrophe: "don't", "it's")."""
    return [w.lower() for w in _WORD.findall(text)]


def looks_unfinished(response: str) -> bool:
    """True when the reply seems cut off: its last line is prose (not a list item) that does not end with
    sentence punctuation or a closing bracket/quote, or it ends with `,`, `;`, `:` or `-` whatever it is."""
    last_line = response.strip().splitlines()[-1].strip() if response.strip() else ""
    if not last_line:
        return False
    if last_line.endswith((",", ";", ":", "-")):
        return True
    return not _LIST_ITEM.match(last_line) and not last_line.endswith(_FINISHED_ENDINGS)


def conciseness(prompt: str, response: str) -> float:
    """Brevity in words, in [0, 1]: `scale / (scale + n_words)` with scale = CONCISENESS_SCALE_WORDS (30).

    10 words -> 0.75, 30 -> 0.5, 90 -> 0.25. An empty reply (no words) scores 0: saying nothing is not
    concise. A reply that `looks_unfinished` (typically cut off by the token limit) is multiplied by
    UNFINISHED_FACTOR (0.5). The prompt is not used; it is a parameter so every judge has one signature.
    """
    n = len(words(response))
    if n == 0:
        return 0.0
    score = CONCISENESS_SCALE_WORDS / (CONCISENESS_SCALE_WORDS + n)
    return score * UNFINISHED_FACTOR if looks_unfinished(response) else score


# ---------------------------------------------------------------------------------------------- positivity

POSITIVE_WORDS = frozenset("""
    amazing appreciate awesome beautiful benefit best brilliant calm cheerful comfortable delicious delight
    delightful easy encourage enjoy enjoyable excellent exciting fantastic fun glad good gorgeous grateful great
    happy healthy helpful hope hopefully joy kind love lovely nice perfect please pleasant pleased positive
    refreshing relax relaxing rewarding safe smile success successful sure thank thanks thrilled useful
    welcome wonderful worth
""".split())
NEGATIVE_WORDS = frozenset("""
    angry annoying awful bad boring careless confusing dangerous difficult disappointing dull fail failure
    fault hard harmful hate horrible hurt impossible lazy mess mistake nasty never nothing pain poor problem
    problems sad scary sorry stupid terrible tired trouble ugly unfortunately unhappy unpleasant useless
    waste worry worse worst wrong
""".split())
NEGATORS = frozenset({"not", "no", "don't", "doesn't", "didn't", "isn't", "aren't", "wasn't", "won't", "can't",
                      "never", "without"})
_LEXICON = POSITIVE_WORDS | NEGATIVE_WORDS
POSITIVITY_GAIN = 10.0  # a net +1 word per 20 words -> 0.5 + 0.5 * tanh(0.5) = 0.73


def positivity(prompt: str, response: str) -> float:
    """Polite, positive tone from the word lists above, in [0, 1]; 0.5 is neutral.

    net = (#positive words - #negative words) / #words, where a lexicon word right after a negator
    ("not", "don't", "never", ... in NEGATORS) counts with the opposite sign ("don't worry" is positive,
    "not good" negative); "never" is itself negative only when it does not negate the next word.
    score = 0.5 + 0.5 * tanh(POSITIVITY_GAIN * net). An empty reply is neutral (0.5). The prompt is not used.
    """
    tokens = words(response)
    if not tokens:
        return 0.5
    net = 0
    for i, word in enumerate(tokens):
        if word in NEGATORS and i + 1 < len(tokens) and tokens[i + 1] in _LEXICON:
            continue  # the negator's meaning is carried by the word it flips
        sign = 1 if word in POSITIVE_WORDS else -1 if word in NEGATIVE_WORDS else 0
        net += -sign if i > 0 and tokens[i - 1] in NEGATORS else sign
    return 0.5 + 0.5 * math.tanh(POSITIVITY_GAIN * net / len(tokens))


# ---------------------------------------------------------------------------------------------- format

# How the demo prompts ask for each format: str.format templates ({n}: the number of steps; {{ }}: a literal
# brace). The build script picks among these.
FORMAT_PHRASES: dict[str, tuple[str, ...]] = {
    "bullets": (
        "Answer as a bulleted list, one point per line starting with '-'.",
        "Please reply with a short bulleted list.",
        "Format: a bullet-point list.",
    ),
    "one_sentence": (
        "Answer in a single sentence.",
        "Reply with exactly one sentence.",
        "Keep it to one sentence, please.",
    ),
    "numbered_steps": (
        "Give exactly {n} numbered steps.",
        "Answer as a numbered list of {n} steps.",
        "Explain it in {n} numbered steps.",
    ),
    "all_caps": (
        "Write your whole answer in ALL CAPS.",
        "Reply using only uppercase letters.",
        "Answer in capital letters only.",
    ),
    "json": (
        'Reply only with a JSON object like {{"answer": "..."}}.',
        "Give your answer as a JSON object.",
        "Format: JSON only, no other text.",
    ),
}
FORMATS = tuple(FORMAT_PHRASES)

_NUMBER_WORDS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}
_STEPS = re.compile(r"\b(\d+|" + "|".join(_NUMBER_WORDS) + r")\s+(?:numbered\s+steps|steps)\b", re.IGNORECASE)
# Checked in this order; the first match decides (numbered steps before bullets: "a numbered list" is no bullet).
_REQUEST_PATTERNS: tuple[tuple[str, re.Pattern], ...] = (
    ("json", re.compile(r"\bjson\b", re.IGNORECASE)),
    ("all_caps", re.compile(r"\ball caps\b|\buppercase\b|\bcapital letters\b", re.IGNORECASE)),
    ("numbered_steps", re.compile(r"\bnumbered\b", re.IGNORECASE)),
    ("bullets", re.compile(r"\bbullet(?:ed|s)?\b", re.IGNORECASE)),
    ("one_sentence", re.compile(r"\b(?:one|single)\s+sentence\b", re.IGNORECASE)),
)


class FormatRequest(NamedTuple):
    kind: str  # one of FORMATS
    steps: int | None = None  # numbered_steps: the number of steps asked for


def parse_format_request(prompt: str) -> FormatRequest | None:
    """The format the prompt asks for, or None when it asks for none of FORMATS.

    Keywords, first match wins: "JSON" -> json; "ALL CAPS" / "uppercase" / "capital letters" -> all_caps;
    "numbered" -> numbered_steps (N from "N steps" / "N numbered steps", digits or two..ten); "bullet(ed/s)"
    -> bullets; "one/single sentence" -> one_sentence.
    """
    for kind, pattern in _REQUEST_PATTERNS:
        if not pattern.search(prompt):
            continue
        if kind != "numbered_steps":
            return FormatRequest(kind)
        found = _STEPS.search(prompt)
        if found is None:
            raise ValueError(f"prompt asks for numbered steps but says not how many ('N steps'): {prompt!r}")
        count = found.group(1).lower()
        return FormatRequest(kind, int(count) if count.isdigit() else _NUMBER_WORDS[count])
    return None


def _lines(response: str) -> list[str]:
    return [line.strip() for line in response.splitlines() if line.strip()]


def _bullets_score(response: str, request: FormatRequest) -> float:
    """Fraction of non-empty lines that are '-', '*' or '•' items; 0 with fewer than 2 items."""
    lines = _lines(response)
    items = sum(bool(re.match(r"[-*\u2022]\s+\S", line)) for line in lines)
    return items / len(lines) if items >= 2 else 0.0


_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


def _one_sentence_score(response: str, request: FormatRequest) -> float:
    """1 / number of sentences (sentences split at . ! ? followed by space/end, and at line breaks)."""
    pieces = [p for line in _lines(response) for p in _SENTENCE_END.split(line) if re.search(r"[A-Za-z0-9]", p)]
    return 1.0 / len(pieces) if pieces else 0.0


def _numbered_steps_score(response: str, request: FormatRequest) -> float:
    """With k lines numbered "1." / "1)" ...: max(0, 1 - |k - N| / N); 0 when there are none."""
    k = sum(bool(re.match(r"\d+[.)]\s+\S", line)) for line in _lines(response))
    return max(0.0, 1.0 - abs(k - request.steps) / request.steps) if k else 0.0


def _all_caps_score(response: str, request: FormatRequest) -> float:
    """Fraction of the letters that are upper case; 0 when there are no letters."""
    letters = [c for c in response if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0


_FENCE = re.compile(r"^```[A-Za-z]*\s*|\s*```$")


def _json_score(response: str, request: FormatRequest) -> float:
    """1 when the whole reply (``` fences allowed) is a JSON object; 0.5 when a JSON object sits inside
    other text (from the first '{' to the last '}'); 0 otherwise."""
    body = _FENCE.sub("", response.strip())
    for candidate, score in ((body, 1.0), (body[body.find("{"): body.rfind("}") + 1], 0.5)):
        try:
            if isinstance(json.loads(candidate), dict):
                return score
        except ValueError:
            continue
    return 0.0


_FORMAT_CHECKS: dict[str, Callable[[str, FormatRequest], float]] = {
    "bullets": _bullets_score,
    "one_sentence": _one_sentence_score,
    "numbered_steps": _numbered_steps_score,
    "all_caps": _all_caps_score,
    "json": _json_score,
}


def format_following(prompt: str, response: str) -> float:
    """How well the reply follows the format the prompt asks for, in [0, 1] (`parse_format_request`):

        bullets         fraction of non-empty lines that are '-', '*' or '•' items; 0 with fewer than 2 items
        one_sentence    1 / number of sentences (split at . ! ? and line breaks); 0 when empty
        numbered_steps  k numbered lines ("1." / "1)") for N asked: max(0, 1 - |k - N| / N); 0 when k = 0
        all_caps        fraction of letters that are upper case; 0 without letters
        json            1: the whole reply (``` fences allowed) is a JSON object; 0.5: one is embedded in
                        other text; 0 otherwise

    Raises ValueError when the prompt asks for none of these formats: the demo data always asks for one, so
    a missing request is a bug in the caller, not a reply to score.
    """
    request = parse_format_request(prompt)
    if request is None:
        raise ValueError(f"the prompt asks for no known format ({', '.join(FORMATS)}): {prompt!r}")
    return _FORMAT_CHECKS[request.kind](response, request)


JUDGES: dict[str, Callable[[str, str], float]] = {
    "conciseness": conciseness,
    "format": format_following,
    "positivity": positivity,
}
# Sorted on purpose: it is the order `read_normalised` gives listwise objectives when none are configured,
# so a lambda vector written in this order lines up with the prepared data without any extra setting.
OBJECTIVES = tuple(JUDGES)


def score_all(prompt: str, response: str) -> dict[str, float]:
    """Every judge's score of `response` to `prompt`, keyed and ordered by OBJECTIVES."""
    return {name: JUDGES[name](prompt, response) for name in OBJECTIVES}
