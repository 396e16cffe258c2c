"""Serving under load: concurrent clients sending ``/invocations`` requests of a batch of clips
to ``mlflow models serve -m models:/NAME@champion --env-manager local``.

1. One MLflow server on 127.0.0.1 (a store in the work folder); `msa run` of FINE, the invariant
   model and DBR on the data's frozen text features, which registers each model and their stacked
   ensemble (`serving_latency.py`'s first sweep; its functions are reused here).
2. Per model (``msa-fine-<dataset>`` and ``msa-ensemble-<dataset>``, each at its champion
   alias): request i carries test clips [k*batch, (k+1)*batch) with k = i mod (test clips //
   batch), as MLflow's tensor JSON (the bodies are encoded before the clock starts). The model
   loaded in this process (`load_registered`) predicts each of these batches: the expected
   answers. It predicts per batch, not the whole split once then sliced, because a prediction
   can depend on its batch: on mosi_lite, DBR's (so the ensemble's) differ from the whole
   split's in float32 rounding on a clip or two of half the batches (by up to 2.4e-7, the
   ensemble's 2.2e-7: ``batch_vs_whole_split_max_abs_diff`` in the output).
3. `mlflow models serve` with ``--workers`` from --server-workers (default 1, MLflow's default;
   passed as MLFLOW_MODELS_WORKERS, the variable that option reads), one warm-up request, then
   the requests: first from one client (a baseline), then from --clients threads at once, each
   sending the next request when it has its answer. Every answer is compared bit for bit with the
   in-process prediction of the same batch; errors are counted by kind (HTTP status not 200,
   connection error, timeout after 300 s, wrong or unreadable answer). Throughput is over the
   wall clock of each pass; latency is from sending to the parsed answer, over the requests
   answered correctly.

Prints one JSON object; exits 1 if any request failed or any answer differed.

    .venv/bin/python benchmarks/serving_load.py --data ../shared/data/mosi_lite.npz [--clients 8] [--requests 400]
        [--batch 16] [--server-workers 1] [--workdir W [--reuse]]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import threading
import time
import urllib.error
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import serving_latency as latency  # noqa: E402

ERRORS = ("http_error", "connection_error", "timeout", "wrong_answer")


def send(base: str, body: bytes, expected: np.ndarray) -> tuple[str | None, float]:
    """One request: (None, seconds) when the answer equals `expected` bit for bit, else (error kind, 0)."""
    try:
        seconds, answer = latency.post(base, body)
    except urllib.error.HTTPError:
        return "http_error", 0.0
    except urllib.error.URLError as exc:
        return ("timeout" if isinstance(exc.reason, TimeoutError) else "connection_error"), 0.0
    except TimeoutError:
        return "timeout", 0.0
    except OSError:  # ConnectionResetError, http.client.RemoteDisconnected and the like
        return "connection_error", 0.0
    except (ValueError, KeyError):
        return "wrong_answer", 0.0
    return (None if np.array_equal(answer, expected) else "wrong_answer"), seconds


def load(base: str, bodies: list[bytes], expected: list[np.ndarray], clients: int, requests: int, batch: int) -> dict:
    """Request i (body i mod len(bodies)) from client i mod `clients`, every client in its own thread."""
    results: list[tuple[str | None, float]] = [("connection_error", 0.0)] * requests  # unless a client fills it in

    def client(first: int) -> None:
        for i in range(first, requests, clients):
            results[i] = send(base, bodies[i % len(bodies)], expected[i % len(bodies)])

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    milliseconds = np.asarray([seconds for error, seconds in results if error is None]) * 1000
    p50, p90, p99 = np.percentile(milliseconds, [50, 90, 99]) if milliseconds.size else (np.nan,) * 3
    return {
        "clients": clients, "requests": requests, "errors": {kind: sum(e == kind for e, _ in results) for kind in ERRORS},
        "wall_s": round(wall, 1), "requests_per_s": round(requests / wall, 2), "clips_per_s": round(requests * batch / wall, 1),
        "p50_ms": round(float(p50), 1), "p90_ms": round(float(p90), 1), "p99_ms": round(float(p99), 1),
        "max_ms": round(float(milliseconds.max()), 1) if milliseconds.size else None,
    }


def measure(model_uri: str, uri: str, data: Path, args: argparse.Namespace, scratch: Path) -> dict:
    from msa.platform.data.readers import load_dataset
    from msa.platform.tracking.registry import load_registered, signature_inputs

    model = load_registered(model_uri, uri)
    inputs = signature_inputs(model.metadata.signature, load_dataset(data).splits["test"])
    whole = np.asarray(model.predict(inputs)).astype(np.float64)
    slices = [slice(k * args.batch, (k + 1) * args.batch) for k in range(len(whole) // args.batch)]
    batches = [{name: value[s] for name, value in inputs.items()} for s in slices]
    bodies = [json.dumps({"inputs": {name: value.tolist() for name, value in batch.items()}}).encode() for batch in batches]
    expected = [np.asarray(model.predict(batch)).astype(np.float64) for batch in batches]
    process, base = latency.serve(model_uri, uri, scratch / f"load-{model_uri.replace('/', '_').replace(':', '')}.log")
    try:
        warm_up, _ = latency.post(base, bodies[0])
        one_client = load(base, bodies, expected, 1, args.requests, args.batch)
        concurrent = load(base, bodies, expected, args.clients, args.requests, args.batch)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    return {"model": model_uri, "inputs": sorted(inputs), "distinct_bodies": len(bodies),
            "batch_vs_whole_split_max_abs_diff": max(float(np.abs(e - whole[s]).max()) for e, s in zip(expected, slices)),
            "request_mb": round(np.mean([len(b) for b in bodies]) / 2**20, 2), "warm_up_ms": round(warm_up * 1000, 1),
            "one_client": one_client, "concurrent": concurrent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="an .npz dataset (e.g. mosi_lite)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400, help="requests per pass (one-client, then concurrent)")
    parser.add_argument("--batch", type=int, default=16, help="test clips per request")
    parser.add_argument("--server-workers", type=int, default=1, help="`mlflow models serve --workers`")
    parser.add_argument("--workdir", help="keep the sweep and the store here (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true", help="measure the models an earlier run left in --workdir")
    args = parser.parse_args()
    os.environ["MLFLOW_MODELS_WORKERS"] = str(args.server_workers)

    from msa.platform.tracking.server import MlflowServer

    data = Path(args.data).resolve()
    with tempfile.TemporaryDirectory() as scratch_dir:
        work = Path(args.workdir or scratch_dir).resolve()
        work.mkdir(parents=True, exist_ok=True)
        with MlflowServer(work / "store") as server:
            if not args.reuse:
                latency.msa("run", str(latency.write_config(work, "frozen", str(data), ["fine", "invariant", "dbr"], server.uri,
                                                            ensemble={"top_k": 1, "folds": 3, "seeds": 2})), cwd=work)
            rows = [measure(f"models:/msa-{name}-{data.stem}@champion", server.uri, data, args, work)
                    for name in ("fine", "ensemble")]
    print(json.dumps({"machine": f"{platform.node()} {os.cpu_count()} cores", "python": platform.python_version(),
                      "date": time.strftime("%Y-%m-%d"), "options": {k: v for k, v in vars(args).items() if k != "workdir"},
                      "rows": rows}, indent=1))
    failed = sum(n for row in rows for run in ("one_client", "concurrent") for n in row[run]["errors"].values())
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
