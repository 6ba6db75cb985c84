"""What `demo`, `prepare` and `train` print: the stage lines, one progress display per stage, and nothing else.

Everything else goes to a log file (the demo's `<out>/console.log`; `prepare` and `train`:
`$MALLOWS_RAY_CACHE/logs/<command>-<run.name>.log`) unless `--verbose`:
  * Ray's log records on the driver below ERROR (instance start, token-auth notice, Ray Data execution plans
    and resource warnings) and its per-operator progress bars (one bar per dataset execution stays);
  * the output of Ray workers and actors (Ray Train's `Reporting training result` dumps from every rank,
    model-loading bars) except our own stage lines (`[train] ...`, `[prepare] ...`) and anything that looks
    like an error, which reach the console whole;
  * Python warnings (library deprecation notices), through `logging.captureWarnings`.

`Progress` is the progress display of a stage the driver runs itself (the demo's generations): a bar that
redraws in place on a terminal, one line per update otherwise. The training stage's display is the per-step
line of rank 0 (train/metrics.py's `progress_line`, with its ETA).
"""

from __future__ import annotations

import logging
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

# Worker output lines that reach the console: our stage lines, and anything that looks like an error.
OURS = re.compile(r"\[(?:train|prepare|demo|export|checkpoint)\]")
ERRORS = re.compile(r"Traceback|Error|ERROR|Exception|CRITICAL|FAILED|Killed|OutOfMemory")


def kept_lines(lines: list[str]) -> list[str]:
    """The lines of a batch of worker output that belong on the console: the whole batch when a line in it
    looks like an error (the lines around a traceback explain it), else our stage lines only."""
    if any(ERRORS.search(line) for line in lines):
        return lines
    return [line for line in lines if OURS.search(line)]


_state: dict[str, Any] = {"file": None, "verbose": True}
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")
# Worker output lines go to the log file through this logger only (never to a console handler).
_workers = logging.getLogger("mallows_ray.console.workers")


def configure(log_path: str | Path, *, verbose: bool = False) -> Path:
    """Send the chatter of this process (logging below WARNING from libraries, Python warnings) to `log_path`;
    the console keeps WARNING and above, and everything with `verbose`. Call once, before the stage starts."""
    log_path = Path(log_path).expanduser().resolve()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(log_path)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _state.update(file=file_handler, verbose=verbose, path=log_path)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(file_handler)
    _workers.propagate = False
    _workers.addHandler(file_handler)
    logging.captureWarnings(False)  # a fresh capture: a no-op if an earlier configure in this process made one
    logging.captureWarnings(True)  # warnings -> the "py.warnings" logger -> the file only (below)
    warnings.simplefilter("default")
    if not verbose:
        logging.getLogger("py.warnings").propagate = False
        logging.getLogger("py.warnings").addHandler(file_handler)
        _quiet_libraries()
    return log_path


def _quiet_libraries() -> None:
    """Library progress bars and INFO logs that are not a stage's progress (HF weight loading), and DeepSpeed's
    "Setting accelerator to CPU" notice on a machine without CUDA (naming the CPU accelerator up front is what
    its auto-detection would pick; the variable is inherited by local Ray workers)."""
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def quiet_ray_logs() -> None:
    """Before `ray.init`: Ray's driver-side log records (instance start, token-auth notice, Ray Data plans and
    resource warnings) to the log file, only errors on the console; Ray Data's per-operator bars off (its one
    bar per dataset execution stays). No-op with `verbose`.

    Ray's loggers ("ray", and "ray.data", configured when ray.data is imported) do not propagate to the root
    logger and print through their own stderr handlers, so those handlers are raised to ERROR and the file
    handler is added beside them."""
    if _state["verbose"] or _state["file"] is None:
        return
    import ray.data

    ray.data.DataContext.get_current().enable_operator_progress_bars = False
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)
        if not logger.propagate and _state["file"] not in logger.handlers:
            logger.addHandler(_state["file"])


def quiet_ray_workers() -> None:
    """After `ray.init`: worker output filtered (`kept_lines`), every line kept in the log file. No-op
    with `verbose`."""
    if _state["verbose"] or _state["file"] is None:
        return
    from ray._private import worker as ray_worker

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    with dispatcher._lock:
        handlers = dispatcher.handlers
        dispatcher.handlers = [(name, _filtered(handle) if name == "ray_print_logs" else handle)
                               for name, handle in handlers]


def _filtered(handle):
    """Wrap Ray's handler that prints worker output on the driver: a batch of lines with an error in it is
    printed whole; otherwise only our stage lines; every line goes to the log file. Ray's own processes
    (gcs_server, raylet: a name where a worker has a pid) reach the log file only: their errors at shutdown
    ("Failed to kill actor ...") are Ray's bookkeeping, not the run's."""
    def handler(data: dict[str, Any]) -> None:
        lines = data.get("lines") or []
        source = f"({data.get('actor_name') or data.get('task_name') or 'worker'} pid={data.get('pid')})"
        for line in lines:
            _workers.info(f"{source} {line}")
        if not str(data.get("pid", "")).isdigit():
            return
        kept = kept_lines(lines)
        if kept:
            handle({**data, "lines": kept})

    return handler


def log_path() -> Path | None:
    """The log file `configure` set up, or None."""
    return _state.get("path")


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """A stage's progress: `done/total unit`, rate, elapsed and ETA; a redrawn bar on a terminal, else one
    line per `update`."""

    WIDTH = 24

    def __init__(self, label: str, total: int, unit: str, stream: TextIO | None = None):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.done = 0
        self.started = time.perf_counter()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        bar = ""
        if self.tty:
            filled = int(self.WIDTH * self.done / max(self.total, 1))
            bar = "[" + "#" * filled + "." * (self.WIDTH - filled) + "] "
        eta_text = _clock(eta) if eta == eta else "?"
        return (f"[{self.label}] {bar}{self.done}/{self.total} {self.unit} | {rate:.2f} {self.unit}/s | "
                f"elapsed {_clock(elapsed)} | ETA {eta_text}")

    def update(self, n: int = 1) -> None:
        self.done += n
        end = "\n" if not self.tty or self.done >= self.total else ""
        self.stream.write(("\r" if self.tty else "") + self.line() + end)
        self.stream.flush()
