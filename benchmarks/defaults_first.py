"""Does a study that starts from the model's default config end better at a small budget? Per
model and seed, the same one-dataset sweep (TPE, ASHA, `--trials` trials) twice: with
``search.defaults_first`` (the first trial is the model's defaults, clipped into its search
space) and without (every trial the sampler's). For each, the trial chosen on valid and its test
metrics (read from its checkpoint; test never chooses anything). Prints one JSON object: every
run, and per model and arm the median over seeds of the chosen trial's test and valid score.

    .venv/bin/python benchmarks/defaults_first.py --data ../shared/data/mosi_lite.npz \\
        --models baseline tfn fine invariant dbr --seeds 0 1 2 --trials 6 --epochs 20
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

ARMS = {"defaults first": True, "sampler only": False}


def one_sweep(data: Path, model: str, seed: int, defaults_first: bool, args) -> dict:
    """One sweep; the valid-chosen trial's valid and test metrics."""
    from msa.platform.core.config import build_dataclass
    from msa.platform.sweep.config import SweepConfig, validate_sweep_config
    from msa.platform.sweep.driver import run_sweep
    from msa.platform.training.checkpoint import Checkpoint

    with tempfile.TemporaryDirectory() as storage:
        config = validate_sweep_config(build_dataclass(SweepConfig, {
            "name": "first", "datasets": [str(data)], "models": [model],
            "budget": {"trials_per_pair": args.trials, "max_epochs": args.epochs},
            "search": {"sampler": "tpe", "seed": seed, "scheduler": "asha", "defaults_first": defaults_first},
            "resources": {"cpus_per_worker": args.cpus_per_trial, "max_concurrent_trials": args.concurrent},
            "storage": storage,
        }, where="bench"), where="bench")
        started = time.perf_counter()
        (pair,) = run_sweep(config).pairs
        chosen = Checkpoint(pair.best_checkpoint).metrics
        return {"model": model, "seed": seed, "defaults_first": defaults_first,
                "seconds": round(time.perf_counter() - started, 1), "metric": pair.metric,
                "valid": chosen["valid"], "test": chosen["test"], "params": pair.best_params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--models", nargs="+", default=["baseline", "tfn", "fine", "invariant", "dbr"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--concurrent", type=int, default=2, help="trials at once")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0)
    args = parser.parse_args()

    import ray

    from msa.platform.sweep.cluster import TRIAL_SLOT

    ray.init(resources={TRIAL_SLOT: args.concurrent}, dashboard_host="127.0.0.1", logging_level="WARNING")
    try:
        runs = []
        for model in args.models:
            for seed in args.seeds:
                for first in ARMS.values():
                    runs.append(one_sweep(args.data.resolve(), model, seed, first, args))
                    print(json.dumps(runs[-1]), flush=True)  # kept if the run is stopped
    finally:
        ray.shutdown()
    summary = {}
    for model in args.models:
        summary[model] = {}
        for arm, first in ARMS.items():
            mine = [r for r in runs if r["model"] == model and r["defaults_first"] == first]
            metric = mine[0]["metric"].removeprefix("valid_")
            summary[model][arm] = {f"median_test_{metric}": statistics.median(r["test"][metric] for r in mine),
                                   f"median_valid_{metric}": statistics.median(r["valid"][metric] for r in mine)}
    print(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "data": args.data.name, "trials": args.trials,
        "epochs": args.epochs, "seeds": args.seeds, "summary": summary, "runs": runs,
    }, indent=2))


if __name__ == "__main__":
    main()
