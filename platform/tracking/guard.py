"""The guard of a sweep's own MLflow server: runs as its own process (``python -m
msa.platform.tracking.guard PARENT_PID URI COMMAND...``), started by `MlflowServer.launch` in a
process group with the server.

It starts the server, restarts it when it crashes after it has answered once (at most
`RESTARTS` times, on the same port and store, while MLflow's clients retry), and stops it, with
its uvicorn worker, when asked (SIGTERM to the group) or when the process that launched it is
gone (its parent pid changes, even after a SIGKILL of that process).
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil

from msa.platform.tracking.server import healthy

RESTARTS = 3  # a crashed server is started again at most this many times


def guard(parent: int, uri: str, command: list[str]) -> int:
    """Run `command` (the server at `uri`) while process `parent` lives; restart it if it crashes.

    Returns the server's exit status when it fails to start (exits before ever answering) or
    has crashed too often, and 0 once stopped (SIGTERM to the group, or `parent` gone)."""
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    restarts, answered, server = 0, False, subprocess.Popen(command)
    while True:
        time.sleep(0.5)
        if stopping or os.getppid() != parent:
            _stop_descendants()
            return 0
        status = server.poll()
        if status is None:
            answered = answered or healthy(uri, timeout=1.0)
            continue
        if restarts == RESTARTS or not answered:
            return status
        restarts += 1
        print(f"[guard] mlflow server exited with status {status}; starting it again ({restarts}/{RESTARTS})",
              flush=True)
        answered, server = False, subprocess.Popen(command)


def _stop_descendants(timeout: float = 15.0) -> None:
    """SIGTERM the server and its uvicorn worker, and wait until both are gone (the port free)."""
    tree = psutil.Process().children(recursive=True)  # taken first: the worker outlives the CLI briefly
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    for process in psutil.wait_procs(tree, timeout=timeout)[1]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


if __name__ == "__main__":
    sys.exit(guard(int(sys.argv[1]), sys.argv[2], sys.argv[3:]))
