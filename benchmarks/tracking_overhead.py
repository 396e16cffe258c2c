"""Measure what MLflow tracking costs a sweep, step by step, against a real local server.
Prints one JSON object.

    .venv/bin/python benchmarks/tracking_overhead.py --data ../shared/data/mosi_lite.npz --epochs 30

It trains one real checkpoint first (`train_loop`, baseline), then times each thing the sweep
does per server, per trial, per epoch and per study: starting the server; opening a trial's run
(create, params, dataset input); logging one epoch's record (the trial's per-epoch cost, median
and p95 over `--epochs` records); closing a trial (test metrics, artifacts, learning curves);
registering the checkpoint (pyfunc + alias); loading it back and predicting the test split.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int, default=30, help="epoch records to log (timing sample size)")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

    from msa.platform.core.files import sha256_path
    from msa.platform.data.readers import load_dataset
    from msa.platform.tracking.client import client
    from msa.platform.tracking.registry import load_registered, predict_splits, register_checkpoint
    from msa.platform.tracking.runs import EpochLogger, TrialTracking, log_trial_outcome, open_trial_run
    from msa.platform.tracking.server import MlflowServer
    from msa.platform.training.loop import train_loop

    data = Path(args.data).resolve()
    dataset = load_dataset(data)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        config = {"model": "baseline", "data": str(data), "out": str(scratch / "checkpoint"), "epochs": 2}
        result = train_loop(config, dataset=dataset)
        record = {k: v for k, v in result.history[-1].items()}
        (scratch / "run").mkdir()
        server = MlflowServer(scratch / "run")
        _, server_start_s = timed(server.start)
        try:
            mlflow_client = client(server.uri)
            experiment = mlflow_client.create_experiment("bench")
            study = mlflow_client.create_run(experiment).info.run_id
            tracking = TrialTracking(uri=server.uri, experiment_id=experiment, study_run_id=study, pair="bench", tags={},
                                     dataset_name=dataset.name, dataset_source=str(data),
                                     dataset_fingerprint=sha256_path(data))
            run_id, open_s = timed(open_trial_run, tracking, "trial_00000", config)
            log = EpochLogger(server.uri, run_id)
            epoch_s = []
            for epoch in range(1, args.epochs + 1):
                epoch_s.append(timed(log, {**record, "epoch": epoch})[1])
            _, close_s = timed(log_trial_outcome, mlflow_client, run_id, result.out_dir, "complete")
            _, register_s = timed(register_checkpoint, server.uri, run_id, result.out_dir, "msa-bench", {})
            model, load_s = timed(load_registered, "models:/msa-bench@champion", server.uri)
            _, predict_s = timed(predict_splits, model, dataset, ["test"], what="bench")
        finally:
            server.stop()

    epoch_s.sort()
    print(json.dumps({
        "machine": f"{platform.node()} {os.cpu_count()} CPUs", "data": str(data), "metrics_per_epoch": len(record) - 3,
        "server_start_s": round(server_start_s, 2), "open_trial_run_s": round(open_s, 3),
        "log_epoch_median_ms": round(1000 * statistics.median(epoch_s), 1),
        "log_epoch_p95_ms": round(1000 * epoch_s[int(0.95 * (len(epoch_s) - 1))], 1),
        "close_trial_s": round(close_s, 3), "register_s": round(register_s, 2), "load_registered_s": round(load_s, 2),
        "predict_test_s": round(predict_s, 3), "test_clips": len(dataset.splits["test"]),
    }, indent=2))


if __name__ == "__main__":
    main()
