"""An environment without msa-sweep, in which registered models are loaded and served as a user
who only has the model would: a venv whose interpreter sees this venv's third-party packages
(torch, numpy, mlflow, transformers, through a ``.pth`` line naming their site-packages) but not
the msa-sweep install (the editable install's own ``.pth`` is not read there), so ``import msa``
fails. Importing Ray, Optuna or DeepSpeed there fails too, and each attempt is written to the
file `$MSA_GUARD_LOG` names: a test asserts that serving tried none.

Building it takes a second (no package is installed: the venv reuses this one's), so the test
suite builds it once. Importable from tests (``pythonpath`` in pyproject).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLOCKED = ("ray", "optuna", "deepspeed")
GUARD = '''"""Refuses imports of {blocked} and records each attempt in $MSA_GUARD_LOG."""
import os
import sys


class Guard:
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in {blocked!r}:
            log = os.environ.get("MSA_GUARD_LOG")
            if log:
                with open(log, "a") as handle:
                    handle.write(name + "\\n")
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not needed to serve a model)")
        return None


sys.meta_path.insert(0, Guard())
'''
LOAD_AND_PREDICT = """
import importlib.util
import mlflow.pyfunc
import numpy as np
assert importlib.util.find_spec("msa") is None, "msa is importable here"
model = mlflow.pyfunc.load_model("{model_uri}")
np.save("{out}", np.asarray(model.predict(dict(np.load("{inputs}")))))
"""
SCRIPT = """#!{python}
import sys
from {module} import {function}
sys.exit({function}())
"""


@dataclass(frozen=True)
class CleanEnv:
    """The venv's interpreter and bin folder, and the file guarded imports are logged to."""

    root: Path
    guard_log: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def env(self, tracking_uri: str = "") -> dict[str, str]:
        """Environment of a process in the venv: its bin first on PATH, none of this venv's."""
        # nothing of this process's MLflow settings either (MLflow exports its fluent URIs to os.environ)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("MLFLOW_")}
        env["PATH"] = os.pathsep.join([str(self.root / "bin"), "/usr/local/bin", "/usr/bin", "/bin"])
        env["MSA_GUARD_LOG"] = str(self.guard_log)
        env["MLFLOW_TRACKING_URI"] = tracking_uri
        return env

    def run(self, code: str, *, cwd: Path, tracking_uri: str = "", timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.python), "-c", code], cwd=cwd, env=self.env(tracking_uri), capture_output=True,
                              text=True, timeout=timeout, check=False)

    def guarded_imports(self) -> list[str]:
        return self.guard_log.read_text().split() if self.guard_log.exists() else []

    def forget_guarded_imports(self) -> None:
        self.guard_log.unlink(missing_ok=True)

    def predict(self, model_uri: str, tracking_uri: str, inputs: dict[str, np.ndarray], *, cwd: Path) -> np.ndarray:
        """`mlflow.pyfunc.load_model(model_uri).predict(inputs)` in a fresh process of this venv
        (which first checks that msa is not importable); the predictions as float64."""
        given, out = cwd / "clean_inputs.npz", cwd / "clean_predictions.npy"
        np.savez(given, **inputs)
        done = self.run(LOAD_AND_PREDICT.format(model_uri=model_uri, inputs=given, out=out), cwd=cwd,
                        tracking_uri=tracking_uri)
        assert done.returncode == 0, done.stderr[-3000:]
        return np.load(out).astype(np.float64)


def make_clean_env(root: Path) -> CleanEnv:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = Path(subprocess.run([str(root / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (site / "serving_guard.py").write_text(GUARD.format(blocked=BLOCKED))
    (site / "serving_guard.pth").write_text("import serving_guard\n")
    # the console scripts pip would have written for mlflow and uvicorn (`mlflow models serve` runs `uvicorn`)
    for name, module, function in (("mlflow", "mlflow.cli", "cli"), ("uvicorn", "uvicorn.main", "main")):
        script = root / "bin" / name
        script.write_text(SCRIPT.format(python=root / "bin" / "python", module=module, function=function))
        script.chmod(0o755)
    return CleanEnv(root=root, guard_log=root / "guarded_imports.log")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def served(env: CleanEnv, model_uri: str, tracking_uri: str, *, cwd: Path, timeout: float = 180.0):
    """``mlflow models serve -m MODEL_URI --env-manager local`` run in `env`; yields its base URL
    once ``/ping`` answers, and stops the server (its whole process group) afterwards."""
    port = free_port()
    log = cwd / f"serve-{port}.log"
    with log.open("w") as out:
        process = subprocess.Popen([str(env.root / "bin" / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager",
                                    "local", "--host", "127.0.0.1", "--port", str(port)],
                                   cwd=cwd, env=env.env(tracking_uri), stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"mlflow models serve exited with {process.returncode}: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"mlflow models serve did not answer /ping in {timeout:.0f} s: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def invocations_body(inputs: dict[str, np.ndarray]) -> bytes:
    """The ``/invocations`` request for a tensor-signature model: ``{"inputs": {name: nested lists}}``."""
    return json.dumps({"inputs": {name: np.asarray(value).tolist() for name, value in inputs.items()}}).encode()


def msa_predictions(model_uri: str, tracking_uri: str, data: Path, split: str, *, out: Path) -> np.ndarray:
    """`msa predict` of `split` of `data`: the prediction column of the CSV it writes, as float64
    (its numbers are Python's shortest repr of each value, hence exact)."""
    import csv

    from msa.platform.cli import main

    code = main(["predict", "--model", model_uri, "--data", str(data), "--split", split, "--out", str(out),
                 "--tracking-uri", tracking_uri])
    assert code == 0
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    probabilities = [key for key in rows[0] if key.startswith("prob_")]
    if probabilities:
        return np.asarray([[float(row[key]) for key in probabilities] for row in rows])
    return np.asarray([float(row["prediction"]) for row in rows])


def invoke(base: str, body: bytes) -> np.ndarray:
    """POST `body` to ``/invocations``; the predictions, as float64 (JSON's numbers, exactly)."""
    request = urllib.request.Request(f"{base}/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return np.asarray(json.loads(answer.read())["predictions"], dtype=np.float64)


def serving_inputs(model_uri: str, tracking_uri: str, data: Path, split: str) -> dict[str, np.ndarray]:
    """What `msa predict` hands the model for `split` of `data`: the features its signature
    names, and the transcripts for a model with a text encoder (run in the test's process)."""
    from msa.platform.data.readers import load_dataset
    from msa.platform.tracking.registry import load_registered, signature_inputs

    return signature_inputs(load_registered(model_uri, tracking_uri).metadata.signature, load_dataset(data).splits[split])


def check_serves_like_msa_predict(env: CleanEnv, model_uri: str, tracking_uri: str, data: Path, *, cwd: Path,
                                  split: str = "test", serve: bool = False) -> np.ndarray:
    """Load `model_uri` in `env` (where ``import msa`` fails) and predict `split` of `data`, and
    with `serve` also ask ``mlflow models serve`` for it: each answer is `msa predict`'s, bit for
    bit, and no blocked import (Ray, Optuna, DeepSpeed) was tried. Returns the predictions."""
    env.forget_guarded_imports()
    inputs = serving_inputs(model_uri, tracking_uri, data, split)
    expected = msa_predictions(model_uri, tracking_uri, data, split, out=cwd / "msa_predict.csv")
    assert np.array_equal(env.predict(model_uri, tracking_uri, inputs, cwd=cwd), expected)
    if serve:
        with served(env, model_uri, tracking_uri, cwd=cwd) as base:
            assert np.array_equal(invoke(base, invocations_body(inputs)), expected)
    assert env.guarded_imports() == []
    return expected
