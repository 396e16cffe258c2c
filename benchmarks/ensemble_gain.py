"""Ensemble gain: what each meta-learner buys over the best single model and the seed ensemble.

One real sweep (`run_sweep`: Ray Tune, Optuna TPE + ASHA, DeepSpeed trials, MLflow) of the given
models on one dataset, then `build_ensembles` on its run directory under the cross-fitted protocol
and, with fewer members (each is retrained K times), under the out-of-fold protocol. Everything
is chosen on valid; test is scored once per row. Prints one JSON object: per protocol, every
leaderboard row's valid selection metric, test MAE / Corr / non0 Acc-2, and the paired bootstrap
95% interval of its test difference against the best single model; plus the wall times.

    .venv/bin/python benchmarks/ensemble_gain.py --data ../shared/data/mosi_lite.npz
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPORTED = ("mae", "corr", "acc2_non0")


def summarise(board: dict) -> list[dict]:
    (entry,) = board["datasets"]
    metric = entry["selection_metric"]
    rows = []
    for row in entry["rows"]:
        rows.append({
            "name": row["name"], "kind": row["kind"], f"valid_{metric}": row["valid"][metric],
            **{f"test_{m}": row["test"][m] for m in REPORTED},
            **{f"diff_{m}": [row["test_diff"][m][k] for k in ("diff", "low", "high")] for m in REPORTED},
            "members": len(row["members"]),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--models", nargs="+", default=["baseline", "tfn"])
    parser.add_argument("--trials", type=int, default=8, help="trials per model")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--top-k", type=int, default=5, help="members per model, cross-fitted protocol")
    parser.add_argument("--oof-top-k", type=int, default=2, help="members per model, out-of-fold protocol (0: skip)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()

    import yaml

    from msa.ensembles.build import build_ensembles
    from msa.ensembles.config import EnsembleConfig
    from msa.platform.sweep.config import load_sweep_config
    from msa.platform.sweep.driver import run_sweep

    # Progress (Tune's tables, the sweep's lines) goes to stderr; stdout is the JSON alone.
    with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(sys.stderr):
        config_file = Path(scratch) / "sweep.yaml"
        config_file.write_text(yaml.safe_dump({
            "name": "ensemble-gain", "storage": str(Path(scratch) / "sweeps"),
            "datasets": [str(Path(args.data).resolve())], "models": args.models,
            "budget": {"trials_per_pair": args.trials, "max_epochs": args.epochs},
            "search": {"sampler": "tpe", "seed": 0, "scheduler": "asha", "grace_period": 3, "reduction_factor": 2},
            "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": 2},
            "train": {"patience": 6},
        }))
        started = time.perf_counter()
        result = run_sweep(load_sweep_config(config_file))
        sweep_seconds = time.perf_counter() - started
        run_dir = result.run_dir.root
        result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "data": args.data,
                  "models": args.models, "trials_per_model": args.trials, "max_epochs": args.epochs,
                  "sweep_seconds": round(sweep_seconds, 1),
                  "trials": {r.pair: {"complete": r.complete, "pruned": r.pruned, "failed": r.failed} for r in result.pairs},
                  "protocols": {}}
        runs = [("crossfit", args.top_k, None)]
        if args.oof_top_k:
            runs.append(("oof", args.oof_top_k, run_dir / "ensembles-oof"))
        for protocol, top_k, out_dir in runs:
            options = EnsembleConfig(top_k=top_k, protocol=protocol, folds=args.folds, seeds=args.seeds,
                                     register=protocol == "crossfit")
            started = time.perf_counter()
            board = build_ensembles(options, run_dir=run_dir, out_dir=out_dir).to_dict()
            result["protocols"][protocol] = {"top_k_per_model": top_k, "seconds": round(time.perf_counter() - started, 1),
                                             "rows": summarise(board)}
    print(json.dumps(result, indent=2))  # after the redirect ends: on stdout


if __name__ == "__main__":
    main()
