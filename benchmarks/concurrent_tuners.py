"""The alternative to one Tune run for the whole matrix: one `Tuner.fit()` per pair, driven
concurrently from one driver (a thread per pair). Two tiny Tune runs (a function trainable,
2 samples each) start at once on a private Ray runtime; prints how each ended.

    .venv/bin/python benchmarks/concurrent_tuners.py

On Ray 2.60 one run finished and the other raised inside Tune (`benchmarks/RESULTS.md`, [3/5]).
"""
from __future__ import annotations

import json
import tempfile
import threading
import time

import ray
from ray import tune


def trainable(config: dict) -> None:
    for epoch in range(3):
        time.sleep(0.5)
        tune.report({"score": config["x"] * epoch, "epoch": epoch + 1})


def main() -> None:
    ray.init(num_cpus=2, log_to_driver=False)
    storage, outcomes = tempfile.mkdtemp(prefix="tuners-"), {}

    def fit(name: str) -> None:
        tuner = tune.Tuner(trainable, param_space={"x": tune.uniform(0, 1)},
                           tune_config=tune.TuneConfig(num_samples=2, max_concurrent_trials=1),
                           run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0))
        try:
            grid = tuner.fit()
            outcomes[name] = {"ended": "ok", "trials": len(grid), "errors": len(grid.errors)}
        except Exception as exc:  # what Tune raised is the measurement
            outcomes[name] = {"ended": "raised", "error": f"{type(exc).__name__}: {exc}"[:300]}

    threads = [threading.Thread(target=fit, args=(f"pair{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ray.shutdown()
    print(json.dumps({"ray": ray.__version__, "outcomes": outcomes}, indent=2))


if __name__ == "__main__":
    main()
