"""Ray instances that a test starts outside the pytest process (a `ray start` head, a simulated multi-node
cluster in a subprocess), each in a scratch folder of its own, and their complete teardown.

`ray stop` is never used: it ends every Ray process on the machine, including the session's own Ray (the
`ray_local` fixture) and other people's instances. Neither the process tree nor the process group finds all
processes of an instance either (job drivers start new sessions, raylets move workers into their own process
groups, orphans are re-parented), so every process of an isolated instance carries a marker variable in its
environment, inherited from the process the test starts down to GCS, raylets, workers and job drivers, and
`kill_marked` ends exactly the processes with that marker.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

MARKER = "MALLOWS_RAY_TEST_INSTANCE"


@dataclass(frozen=True)
class Scratch:
    folder: Path      # Ray's temp dir (sessions, logs, ray_current_cluster) and the test's files
    token_file: Path  # the instance's auth token (RAY_AUTH_TOKEN_PATH); ~/.ray/auth_token stays untouched
    env: dict[str, str]  # environment for every process of the instance and for its clients


@contextmanager
def isolated_ray_scratch() -> Iterator[Scratch]:
    """A scratch folder, a fresh token and the environment for an isolated, token-authenticated Ray instance.

    On exit every process started with `env` is ended and the folder (with any `ray_current_cluster` file a
    head wrote there, which would otherwise make a later bare `ray.init()` join a dead head) is deleted.
    """
    # directly under /tmp: Ray's unix sockets live under the temp dir and their paths are limited to 107 bytes
    folder = Path(tempfile.mkdtemp(prefix="mr-ray-", dir="/tmp" if os.path.isdir("/tmp") else None))
    token_file = folder / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # nothing of the session's Ray
    env.update({
        MARKER: str(folder),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "TMPDIR": str(folder),  # Ray's default temp dir (and its ray_current_cluster file) follow TMPDIR
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),  # `ray`, `python`
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    })
    try:
        yield Scratch(folder, token_file, env)
    finally:
        kill_marked(str(folder))
        shutil.rmtree(folder, ignore_errors=True)


def kill_marked(marker: str, grace_s: float = 10.0) -> int:
    """SIGTERM, then after `grace_s` SIGKILL, every process whose environment has MARKER=marker; returns the
    number of processes found."""
    marked = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(MARKER) == marker:
                marked.append(proc)
        except (psutil.Error, OSError):  # gone, a zombie, or another user's process
            continue
    for proc in marked:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(marked, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return len(marked)


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that were free a moment ago (the sockets stay open until all
    are picked, so the kernel hands out different ones)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
