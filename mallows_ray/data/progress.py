"""The one progress display of `prepare`: rows read, rejected and scored (tokenized with it) so far, the current
stage's rate and, where its total is known, its ETA. The driver counts the rows as the stream of each stage
passes through it (it writes them), so the display needs no hook into Ray Data's operators, whose own
per-operator bars `prepare` turns off.

On a terminal the line is redrawn in place; otherwise (a log, CI) one line is printed at most every
`interval` seconds and at the end of each stage.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


class PrepareProgress:
    COUNTERS = ("read", "rejected", "scored")

    def __init__(self, stream: TextIO | None = None, interval: float = 10.0):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.interval = interval if not self.tty else 0.2
        self.counts = dict.fromkeys(self.COUNTERS, 0)
        self.label, self.total, self.done = "", None, 0
        self.started = self.shown = time.perf_counter()

    def stage(self, label: str, total: int | None = None) -> None:
        """Start a stage (`label`, e.g. "scoring train"), of `total` rows when known."""
        self.label, self.total, self.done = label, total, 0
        self.started = time.perf_counter()

    def add(self, **counts: int) -> None:
        """Rows that passed a counter (read=, rejected=, scored=); the first one given also
        advances the current stage."""
        for name, n in counts.items():
            self.counts[name] += n
        self.done += next(iter(counts.values()), 0)
        if time.perf_counter() - self.shown >= self.interval:
            self._show(end="" if self.tty else "\n")

    def end_stage(self) -> None:
        self._show(end="\n")

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        counts = " | ".join(f"{name} {n}" for name, n in self.counts.items())
        eta = ""
        if self.total is not None:
            left = (self.total - self.done) / rate if rate > 0 else float("nan")
            eta = f" | {self.done}/{self.total} | ETA {_clock(left) if left == left else '?'}"
        return f"[prepare] {self.label}: {counts} | {rate:.1f} rows/s{eta} | elapsed {_clock(elapsed)}"

    def _show(self, end: str) -> None:
        self.shown = time.perf_counter()
        self.stream.write(("\r" if self.tty else "") + self.line() + end)
        self.stream.flush()
