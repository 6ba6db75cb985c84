"""A background thread tied to a `with` block, for tests that act on a run while it trains."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable


@contextmanager
def in_thread(action: Callable[[threading.Event], None]):
    """Run `action(done)` in a thread for the block's duration; `done` is set when the block is left."""
    done = threading.Event()
    thread = threading.Thread(target=action, args=(done,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
