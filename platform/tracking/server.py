"""The MLflow tracking server a sweep logs to, and the check of a tracking URI the user gives.

`MlflowServer` runs `mlflow server` for one run directory: a SQLite backend and an artifact
folder under ``<run_dir>/mlflow/``, bound to 127.0.0.1 on a free port unless the caller names
another host, with one worker and no job execution (MLflow 3.17: starts in about 7 s with about
530 MB, against 18 s and 1.6 GB with the defaults). It is a context manager: the server is
stopped (its whole process group) on exit, whatever happened inside, and also when the start
itself is interrupted (Ctrl-C while it boots). `check_tracking_uri` is called before any trial
starts, so an unreachable server is one clear error instead of every trial failing.

The server runs under a guard (`guard.py`, its own process) in the same process group: a server
that crashes mid-sweep is started again on the same port and store, while MLflow's clients retry
their requests (about 4 minutes by default), so no epoch's metrics are lost; and the server is
stopped when the process that launched it dies, even by SIGKILL, instead of lingering on its port.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from msa.platform.core.compat import forget_artifact_repositories
from msa.platform.core.errors import MsaError
from msa.platform.core.run_dir import RunDir

LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT_S = 90.0


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class MlflowServer:
    """`mlflow server` over one run directory's store; ``with MlflowServer(run_dir) as server:``."""

    def __init__(self, run_dir: Path, *, host: str = LOOPBACK, port: int | None = None):
        self.run_dir, self.host = Path(run_dir).resolve(), host
        self.port = port if port is not None else free_port(LOOPBACK if host == LOOPBACK else "")
        self.process: subprocess.Popen | None = None
        self.log_path = RunDir(self.run_dir).mlflow_log

    @property
    def uri(self) -> str:
        # Clients on this machine always reach it over loopback, whatever it is bound to.
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> "MlflowServer":
        """Launch the server and wait until it answers."""
        return self.launch().wait_ready()

    def launch(self) -> "MlflowServer":
        """Launch the server without waiting (it boots in ~7 s while the caller does other work)."""
        forget_artifact_repositories()  # runs of this store met earlier in this process were served elsewhere
        store = RunDir(self.run_dir)
        database, artifacts = store.mlflow_db, store.mlflow_artifacts
        artifacts.mkdir(parents=True, exist_ok=True)
        mlflow_cli = Path(sys.executable).parent / "mlflow"
        command = [
            str(mlflow_cli), "server", "--host", self.host, "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{database}", "--artifacts-destination", artifacts.as_uri(),
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        guarded = [sys.executable, "-m", "msa.platform.tracking.guard", str(os.getpid()), self.uri, *command]
        # A Ctrl-C while the guard is being spawned is held until `self.process` holds it:
        # raised inside Popen, it would leave a guard that stop() cannot see.
        with self.log_path.open("ab") as log, _interrupts_held():
            # Guard and server in a process group of their own, so stop() reaches all of them.
            self.process = subprocess.Popen(guarded, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        return self

    def wait_ready(self) -> "MlflowServer":
        """Block until the launched server answers /health; raise, and stop it, if it never does
        or the wait is interrupted."""
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:]
                    raise MsaError(f"mlflow server exited at start (status {self.process.returncode}): "
                                   f"{tail[0] if tail else 'no output'}; see {self.log_path}")
                if healthy(self.uri, timeout=1.0):
                    return self
                time.sleep(0.5)
            raise MsaError(f"mlflow server did not answer on {self.uri} within {STARTUP_TIMEOUT_S:.0f} s; "
                           f"see {self.log_path}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the guard and the server, and wait until they are gone (a second Ctrl-C meanwhile
        is held back until then, so it cannot leave the server running)."""
        if self.process is None or self.process.poll() is not None:
            return
        with _interrupts_held():
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> "MlflowServer":
        try:
            return self.start()
        except BaseException:  # Ctrl-C while it boots: __exit__ will not run
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def _interrupts_held():
    """SIGINT recorded instead of raised inside the block, then raised at its end (main thread
    only: signal handlers cannot be set elsewhere, and there SIGINT is not delivered anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def healthy(uri: str, timeout: float) -> bool:
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
    if not healthy(uri, timeout):
        raise MsaError(f"MLflow tracking server {uri} is unreachable (no answer from {uri.rstrip('/')}/health "
                       f"within {timeout:g} s); start it or fix the URI")


def require_store(run_dir: Path) -> Path:
    """`run_dir`, after checking it holds an MLflow store to serve.

    Raises:
        MsaError: no mlflow/mlflow.db in it.
    """
    database = RunDir(run_dir).mlflow_db
    if not database.is_file():
        raise MsaError(f"{run_dir} has no MLflow store ({database} does not exist)")
    return Path(run_dir)


@contextlib.contextmanager
def serving(uri: str, run_dir: Path | None):
    """The tracking URI to use while the block runs: `uri` once it answers, else `run_dir`'s
    own store, served for the block (loopback, a free port).

    Raises:
        MsaError: `uri` does not answer, or `run_dir` has no store.
    """
    if uri:
        check_tracking_uri(uri)
        yield uri
        return
    if run_dir is None:
        raise MsaError("no tracking server: pass --tracking-uri URI or --run-dir RUN_DIR, or set MLFLOW_TRACKING_URI")
    with MlflowServer(require_store(run_dir)) as server:
        yield server.uri
