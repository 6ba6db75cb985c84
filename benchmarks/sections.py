"""RESULTS.md holds sections written by different commands: `run.py` the speed rows, `results.py` the held-out
table. Each command's block sits between `<!-- NAME:start -->` and `<!-- NAME:end -->` markers, so regenerating
one keeps the others."""

from __future__ import annotations

import re


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def section_names(document: str) -> list[str]:
    """The names of the sections `document` holds, in order (a section's name may be set by hand, e.g. a
    `scale` run's block renamed so that a later run at other sizes does not replace it)."""
    return re.findall(r"<!-- ([\w.-]+):start -->", document)


def get_section(document: str, name: str) -> str | None:
    """The block of section `name` (without its markers), or None when the document has none."""
    start, end = _markers(name)
    if start not in document or end not in document:
        return None
    return document.split(start, 1)[1].split(end, 1)[0].strip("\n")


def replace_section(document: str, name: str, block: str) -> str:
    """`document` with section `name` set to `block`: in place when it exists, else appended."""
    start, end = _markers(name)
    wrapped = f"{start}\n{block.strip(chr(10))}\n{end}"
    if get_section(document, name) is None:
        return (document.rstrip("\n") + "\n\n" if document.strip() else "") + wrapped + "\n"
    before, rest = document.split(start, 1)
    return before + wrapped + rest.split(end, 1)[1]
