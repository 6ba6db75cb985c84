"""Property-based fuzzing of the readers and normalisers (issue 15: "readers never raise on bad data").

Whatever a row or a file holds -- random JSON values, random bytes, random Unicode with lone surrogates, huge
numbers, deep nesting, a plain / gzip / parquet file cut at a random byte -- reading never raises, every row
read is either a record or a reject (rows in = rows out + rejects), records fit NORMALISED_SCHEMA in Arrow,
rejects can be written to the rejects file, and where the input is valid the record is exactly what was
written (nothing silently altered). `normaliser_error` (the safety net for unforeseen failures) never occurs.

Examples per test are in EXAMPLES; the whole module runs in well under a minute on one CPU core.
"""

from __future__ import annotations

import gzip
import io
import json
import math
from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mallows_ray.data.detect import FORMATS
from mallows_ray.data.normalise import normalise_source, read_normalised
from mallows_ray.data.rejects import REASONS, Reject, RejectsFile, read_rejects
from mallows_ray.data.schema import NORMALISED_SCHEMA
from mallows_ray.data.sources import RawRow

EXAMPLES = {"records": 500, "mutated": 500, "bytes": 300, "unicode": 400, "numbers": 400, "nesting": 200,
            "truncation": 400}


def _settings(name: str):
    return settings(max_examples=EXAMPLES[name], deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------- strategies

# text with lone surrogates, control characters and whitespace among ordinary characters
TEXT = st.text(st.one_of(st.characters(), st.characters(categories=["Cs"]), st.sampled_from(" \n\t\r\x00")),
               max_size=30)
HUGE_INTS = st.integers(min_value=-(10**400), max_value=10**400)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), HUGE_INTS, st.floats(), TEXT)
KEYS = st.one_of(st.sampled_from([
    "id", "prompt_id", "prompt", "chosen", "rejected", "responses", "scores", "instruction", "completions",
    "response", "annotations", "Rating", "role", "content", "score_chosen", "score_rejected",
]), TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
                    max_leaves=25)
RECORDS = st.dictionaries(KEYS, JSON, max_size=8)


def _msg(role, text):
    return {"role": role, "content": text}


VALID = [  # one valid record per format; `mutated` replaces one part of one of them by a random value
    {"prompt": "p", "chosen": "a", "rejected": "b"},
    {"prompt": [_msg("user", "p")], "chosen": [_msg("assistant", "a")], "rejected": [_msg("assistant", "b")]},
    {"chosen": [_msg("user", "p"), _msg("assistant", "a")], "rejected": [_msg("user", "p"), _msg("assistant", "b")]},
    {"chosen": "\n\nHuman: p\n\nAssistant: a", "rejected": "\n\nHuman: p\n\nAssistant: b"},
    {"prompt": "p", "chosen": [_msg("user", "p"), _msg("assistant", "a")],
     "rejected": [_msg("user", "p"), _msg("assistant", "b")], "score_chosen": 9, "score_rejected": 2},
    {"id": "x", "prompt": "p", "responses": ["a", "b", "c"], "scores": {"x": [1, 2, 3], "y": [3, 2, 1]}},
    {"instruction": "p", "completions": [{"response": "a", "annotations": {"h": {"Rating": "1"}}},
                                         {"response": "b", "annotations": {"h": {"Rating": "4"}}}]},
]


def _paths(value, prefix=()):
    """Every path (tuple of keys / indices) into a nested value, the root included."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from _paths(child, (*prefix, key))


@st.composite
def mutated(draw):
    record = json.loads(json.dumps(draw(st.sampled_from(VALID))))  # a deep copy
    path = draw(st.sampled_from([p for p in _paths(record) if p]))
    parent = record
    for key in path[:-1]:
        parent = parent[key]
    if draw(st.booleans()) and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(JSON)
    return record


# ---------------------------------------------------------------------------------------------- checks


def _check_reject(reject: Reject) -> None:
    assert reject.reason in REASONS and reject.reason != "normaliser_error", reject.describe()
    assert reject.source and isinstance(reject.row, int)
    json.dumps(asdict(reject), ensure_ascii=False).encode("utf-8")  # what RejectsFile writes: valid UTF-8


def _check_outcomes(records, rejects, tmp_dir) -> None:
    for reject in rejects:
        _check_reject(reject)
    # records are Arrow-safe: the conversion the pipeline does, and it round-trips
    assert pa.Table.from_pylist(records, schema=NORMALISED_SCHEMA).to_pylist() == records
    path = tmp_dir / "rejects.jsonl"
    with RejectsFile(path) as out:
        for reject in rejects:
            out.add(reject)
    assert [(r.source, r.row, r.reason) for r in read_rejects(path)] == [(r.source, r.row, r.reason) for r in rejects]


def _non_blank_lines(data: bytes) -> int:
    return sum(1 for line in io.BytesIO(data) if line.strip())


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# ---------------------------------------------------------------------------------------------- normalisers


@_settings("records")
@given(record=RECORDS, fmt=st.sampled_from(("auto", *FORMATS)),
       score_fill=st.sampled_from([None, "min", "mean", 0.5]))
def test_normalise_random_json_records_never_raises(record, fmt, score_fill):
    _, [out] = normalise_source([RawRow("fuzz.jsonl", 1, record)], fmt, score_fill=score_fill)
    if isinstance(out, Reject):
        _check_reject(out)
    else:
        assert pa.Table.from_pylist([out], schema=NORMALISED_SCHEMA).to_pylist() == [out]


@_settings("mutated")
@given(record=mutated(), fmt=st.sampled_from(("auto", *FORMATS)),
       score_fill=st.sampled_from([None, "min", "mean", 1e308]))
def test_normalise_mutated_valid_records_never_raises(record, fmt, score_fill):
    _, [out] = normalise_source([RawRow("fuzz.jsonl", 1, record)], fmt, score_fill=score_fill)
    if isinstance(out, Reject):
        _check_reject(out)
    else:
        assert pa.Table.from_pylist([out], schema=NORMALISED_SCHEMA).to_pylist() == [out]
        assert all(math.isfinite(v) for scores in out["scores"] for v in scores)


# ---------------------------------------------------------------------------------------------- readers


@_settings("bytes")
@given(lines=st.lists(st.one_of(st.binary(max_size=80), st.just(b'{"prompt": "p", "chosen": "a", "rejected": "b"}')),
                      max_size=15),
       gz=st.booleans())
def test_random_byte_lines_become_rows_or_rejects(tmp_dir, lines, gz):
    data = b"\n".join(lines)
    path = tmp_dir / ("bytes.jsonl.gz" if gz else "bytes.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    records, rejects = read_normalised(str(path))
    assert len(records) + len(rejects) == _non_blank_lines(data.removeprefix(b"\xef\xbb\xbf"))
    _check_outcomes(records, rejects, tmp_dir)


@_settings("unicode")
@given(rows=st.lists(st.tuples(TEXT, TEXT, TEXT), min_size=1, max_size=8))
def test_random_unicode_texts_are_kept_exactly_or_rejected(tmp_dir, rows):
    """JSON escapes lone surrogates as \\udXXX: valid JSON, invalid Unicode once decoded."""
    path = tmp_dir / "unicode.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows))
    records, rejects = read_normalised(str(path))
    assert len(records) + len(rejects) == len(rows)
    _check_outcomes(records, rejects, tmp_dir)
    by_row = {r["row"]: r for r in records}
    for line, (p, c, r) in enumerate(rows, start=1):

        def encodable(text):
            try:
                return bool(text.encode("utf-8"))
            except UnicodeEncodeError:
                return False

        valid = (all(encodable(t) and t.strip() for t in (p, c, r))
                 and " ".join(c.split()) != " ".join(r.split()))
        assert (line in by_row) == valid, (p, c, r, [j.describe() for j in rejects])
        if valid:  # nothing altered
            assert by_row[line]["prompt"] == [{"role": "user", "content": p}]
            assert by_row[line]["responses"] == [c, r]
    surrogates = [j for j in rejects if j.reason == "invalid_unicode"]
    assert all("lone surrogate" in j.detail for j in surrogates)


def _as_score(value):
    """The documented score rule: a finite float from a number or numeric text, else invalid (None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError):
        return None
    return number if math.isfinite(number) else None


NUMBERS = st.one_of(st.integers(), HUGE_INTS, st.floats(), st.sampled_from(["4", "1e400", "N/A", "-0.5", " 7 "]),
                    st.none(), st.booleans())


@_settings("numbers")
@given(scores=st.lists(st.lists(NUMBERS, min_size=3, max_size=3), min_size=1, max_size=3),
       digits=st.sampled_from([0, 20, 400, 4300, 6000]))
def test_huge_and_odd_numbers_in_scores(tmp_dir, scores, digits):
    """Scores of any size and type; `digits` > 0 puts an integer literal of that many digits first (more
    than json.dumps may write: Python limits int <-> str conversions to 4300 digits)."""
    names = [f"o{k}" for k in range(len(scores))]
    items = [[json.dumps(v) for v in column] for column in scores]
    if digits:
        items[0][0] = "9" * digits
    table = ", ".join(f'"{name}": [{", ".join(column)}]' for name, column in zip(names, items))
    path = tmp_dir / "numbers.jsonl"
    path.write_text('{"id": "n1", "prompt": "p", "responses": ["a", "b", "c"], "scores": {' + table + "}}\n")
    records, rejects = read_normalised(str(path))
    assert len(records) + len(rejects) == 1
    _check_outcomes(records, rejects, tmp_dir)
    if digits > 4300:  # Python's JSON parser refuses integers of more than 4300 digits
        assert [r.reason for r in rejects] == ["undecodable"]
        return
    if digits:
        scores[0][0] = int("9" * digits)
    values = [[_as_score(v) for v in column] for column in scores]
    if all(v is not None for column in values for v in column):
        [record] = records
        assert record["scores"] == values and record["objectives"] == names  # exactly the numbers written
    else:
        assert [r.reason for r in rejects] == ["bad_score"], rejects[0].describe()


@_settings("nesting")
@given(depth=st.one_of(st.integers(1, 3000), st.sampled_from([10_000, 100_000])),
       field=st.sampled_from(["prompt", "chosen", "extra"]))
def test_deeply_nested_values(tmp_dir, depth, field):
    row = {"prompt": "p", "chosen": "a", "rejected": "b"}
    line = json.dumps({**row, field: "@"}).replace('"@"', "[" * depth + "]" * depth)
    path = tmp_dir / "deep.jsonl"
    path.write_text(line + "\n" + json.dumps(row) + "\n")
    records, rejects = read_normalised(str(path))
    assert len(records) + len(rejects) == 2
    _check_outcomes(records, rejects, tmp_dir)
    assert records[-1]["row"] == 2 and records[-1]["responses"] == ["a", "b"]
    if field == "extra" and len(records) == 2:  # an extra nested column is ignored, the row is kept
        assert records[0]["responses"] == ["a", "b"]
    else:
        assert len(rejects) == 1 and rejects[0].row == 1


def _rows(n):
    return [{"id": f"r{i}", "prompt": f"question {i} " + "x" * (i % 7), "chosen": f"yes {i}", "rejected": f"no {i}"}
            for i in range(n)]


@_settings("truncation")
@given(n=st.integers(1, 30), kind=st.sampled_from(["plain", "gzip", "parquet"]), cut=st.floats(0, 1))
def test_randomly_truncated_files(tmp_dir, n, kind, cut):
    rows = _rows(n)
    lines = [json.dumps(row).encode() + b"\n" for row in rows]
    if kind == "parquet":
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        data = sink.getvalue()
    else:
        data = gzip.compress(b"".join(lines)) if kind == "gzip" else b"".join(lines)
    k = round(cut * len(data))
    path = tmp_dir / {"plain": "cut.jsonl", "gzip": "cut.jsonl.gz", "parquet": "cut.parquet"}[kind]
    path.write_bytes(data[:k])
    records, rejects = read_normalised(str(path))
    _check_outcomes(records, rejects, tmp_dir)
    ids = [r["id"] for r in records]
    if kind == "plain":
        kept = data[:k]
        assert len(records) + len(rejects) == _non_blank_lines(kept)
        complete = sum(1 for i in range(n) if len(b"".join(lines[: i + 1]).rstrip(b"\n")) <= k)
        assert ids == [row["id"] for row in rows[:complete]]  # every complete line, as written
        assert [r.reason for r in rejects] == ["undecodable"] * (len(rejects))  # the cut line only
        assert len(rejects) <= 1
    elif k == len(data):
        assert ids == [row["id"] for row in rows] and not rejects
    elif kind == "gzip" and k == 0:
        assert not records and not rejects  # an empty file
    else:  # a damaged file fails as a whole; gzip: the rows read + one for the rest, parquet: the footer is gone
        assert not records and rejects and {r.reason for r in rejects} == {"damaged_file"}
        first = 0 if kind == "parquet" else 1
        assert [r.row for r in rejects] == list(range(first, first + len(rejects)))
        assert len(rejects) <= n + 1
