"""The MLflow tracking server a sweep logs to, and the check of a tracking URI the user gives.

`MlflowServer` runs `mlflow server` for one run directory: a SQLite backend and an artifact
folder under ``<run_dir>/mlflow/``, bound to 127.0.0.1 on a free port unless the caller names
another host, with the settings STACK.md measured to start in ~7 s and ~530 MB (one worker, no
job execution). It is a context manager: the server is stopped (its whole process group) on exit,
whatever happened inside. `check_tracking_uri` is called before any trial starts, so an
unreachable server is one clear error instead of every trial failing.

The server runs under a guard (this module run as a script, `guard`) in the same process group:
a server that crashes mid-sweep is started again on the same port and store, while MLflow's
clients retry their requests (about 4 minutes by default), so no epoch's metrics are lost; and
the server is stopped when the process that launched it dies, even by SIGKILL, instead of
lingering on its port.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from msa.platform.errors import MsaError

LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT_S = 90.0


def client(uri: str):
    """An `MlflowClient` for tracking and registry at `uri`."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def store_paths(run_dir: Path) -> tuple[Path, Path]:
    """Where a run directory keeps its MLflow backend database and artifacts."""
    folder = Path(run_dir).resolve() / "mlflow"
    return folder / "mlflow.db", folder / "artifacts"


class MlflowServer:
    """`mlflow server` over one run directory's store; ``with MlflowServer(run_dir) as server:``."""

    def __init__(self, run_dir: Path, *, host: str = LOOPBACK, port: int | None = None):
        self.run_dir, self.host = Path(run_dir).resolve(), host
        self.port = port if port is not None else free_port(LOOPBACK if host == LOOPBACK else "")
        self.process: subprocess.Popen | None = None
        self.log_path = self.run_dir / "mlflow" / "server.log"

    @property
    def uri(self) -> str:
        # Clients on this machine always reach it over loopback, whatever it is bound to.
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> "MlflowServer":
        """Launch the server and wait until it answers."""
        return self.launch().wait_ready()

    def launch(self) -> "MlflowServer":
        """Launch the server without waiting (it boots in ~7 s while the caller does other work)."""
        database, artifacts = store_paths(self.run_dir)
        artifacts.mkdir(parents=True, exist_ok=True)
        mlflow_cli = Path(sys.executable).parent / "mlflow"
        command = [
            str(mlflow_cli), "server", "--host", self.host, "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{database}", "--artifacts-destination", artifacts.as_uri(),
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        guarded = [sys.executable, "-m", "msa.platform.mlflow_server", str(os.getpid()), self.uri, *command]
        with self.log_path.open("ab") as log:
            # Guard and server in a process group of their own, so stop() reaches all of them.
            self.process = subprocess.Popen(guarded, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        return self

    def wait_ready(self) -> "MlflowServer":
        """Block until the launched server answers /health; raise (and stop it) if it never does."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:]
                raise MsaError(f"mlflow server exited at start (status {self.process.returncode}): "
                               f"{tail[0] if tail else 'no output'}; see {self.log_path}")
            if _healthy(self.uri, timeout=1.0):
                return self
            time.sleep(0.5)
        self.stop()
        raise MsaError(f"mlflow server did not answer on {self.uri} within {STARTUP_TIMEOUT_S:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _healthy(uri: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def require_http(uri: str, what: str) -> None:
    """Refuse a tracking URI that is not an http(s) server address (no network access)."""
    if not uri.startswith(("http://", "https://")):
        raise MsaError(f"{what} {uri!r} must be an http(s) address of an MLflow server "
                       "(leave it empty and the sweep starts its own)")


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Refuse a tracking server that does not answer, before anything is logged to it.

    Raises:
        MsaError: the URI is not http(s), or nothing healthy answers there.
    """
    require_http(uri, "tracking URI")
    if not _healthy(uri, timeout):
        raise MsaError(f"MLflow tracking server {uri} is unreachable (no answer from {uri.rstrip('/')}/health "
                       f"within {timeout:g} s); start it or fix the URI")


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
            answered = answered or _healthy(uri, timeout=1.0)
            continue
        if restarts == RESTARTS or not answered:
            return status
        restarts += 1
        print(f"[guard] mlflow server exited with status {status}; starting it again ({restarts}/{RESTARTS})",
              flush=True)
        answered, server = False, subprocess.Popen(command)


def _stop_descendants(timeout: float = 15.0) -> None:
    """SIGTERM the server and its uvicorn worker, and wait until both are gone (the port free)."""
    import psutil  # a dependency of Ray and DeepSpeed

    tree = psutil.Process().children(recursive=True)  # taken first: the worker outlives the CLI briefly
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    for process in psutil.wait_procs(tree, timeout=timeout)[1]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


if __name__ == "__main__":
    sys.exit(guard(int(sys.argv[1]), sys.argv[2], sys.argv[3:]))
