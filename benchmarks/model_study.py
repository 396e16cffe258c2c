"""One model on one dataset: a real sweep, its best config on test, and an ablation at that config.

1. A sweep of `--trials` trials (`run_sweep`: Ray Tune, Optuna TPE + ASHA, DeepSpeed trials,
   MLflow) of `--model` with its own search space; every trial is ranked on valid only.
2. The trial with the best valid selection metric, scored on test (its checkpoint's
   `metrics.json`), against `--reference` figures (e.g. the ridge baseline of the data README).
3. The ablation: the best trial's config retrained with `--seeds` seeds as it is and with each
   `--ablation` applied (`label:key=value,key=value` over `model_config`), two runs at a time.
   Each variant's test metrics are reported as mean and standard deviation over the seeds.

Prints one JSON object on stdout (progress goes to stderr).

    .venv/bin/python benchmarks/model_study.py --data ../shared/data/mosi_lite.npz --model fine \\
        --ablation "no MoQ:use_moq=false" --ablation "no DCQ:use_dcq=false"
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import yaml

REPORTED = ("mae", "corr", "acc2_non0", "f1_non0", "acc7")


def parse_ablation(text: str) -> tuple[str, dict]:
    label, _, settings = text.partition(":")
    overrides = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        overrides[key.strip()] = yaml.safe_load(value)
    if not label or not overrides:
        raise SystemExit(f"--ablation wants 'label:key=value[,key=value]', got {text!r}")
    return label, overrides


def train_one(config: dict) -> dict:
    """One `train_loop` run in a worker process (one torch thread, so two runs share 2 cores)."""
    import torch

    torch.set_num_threads(1)
    from msa.platform.training.loop import train_loop

    started = time.perf_counter()
    result = train_loop(config)
    metrics = json.loads((result.out_dir / "metrics.json").read_text())
    return {"seconds": time.perf_counter() - started, "best_epoch": metrics["best_epoch"],
            "valid": metrics["valid"], "test": metrics["test"]}


def summarise(runs: list[dict]) -> dict:
    def spread(split: str, metric: str) -> list[float]:
        values = [run[split][metric] for run in runs]
        return [round(statistics.mean(values), 4), round(statistics.stdev(values), 4) if len(values) > 1 else 0.0]

    return {"runs": len(runs), "valid_mae": spread("valid", "mae"),
            **{f"test_{m}": spread("test", m) for m in REPORTED},
            "best_epochs": [run["best_epoch"] for run in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per ablation variant")
    parser.add_argument("--ablation", action="append", default=[], type=parse_ablation)
    parser.add_argument("--reference", default="mae=0.963,acc2_non0=79.6",
                        help="test figures to beat (default: ridge on mosi_lite, from the data README)")
    args = parser.parse_args()
    reference = {k: float(v) for k, v in (item.split("=") for item in args.reference.split(","))}

    from msa.ensembles.members import sweep_candidates
    from msa.platform.sweep.config import load_sweep_config
    from msa.platform.sweep.driver import run_sweep

    with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(sys.stderr):
        config_file = Path(scratch) / "sweep.yaml"
        config_file.write_text(yaml.safe_dump({
            "name": f"{args.model}-study", "storage": str(Path(scratch) / "sweeps"),
            "datasets": [str(Path(args.data).resolve())], "models": [args.model],
            "budget": {"trials_per_pair": args.trials, "max_epochs": args.epochs},
            "search": {"sampler": "tpe", "seed": 0, "scheduler": "asha", "grace_period": min(4, args.epochs), "reduction_factor": 2},
            "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": 2},
            "train": {"patience": 6},
        }))
        started = time.perf_counter()
        result = run_sweep(load_sweep_config(config_file))
        (row,) = result.pairs
        sweep_seconds = time.perf_counter() - started

        trials = []
        for candidate in sweep_candidates(result.run_dir.root):
            metrics = json.loads((candidate.folder / "metrics.json").read_text())
            trials.append({"trial": candidate.trial_id, "folder": candidate.folder, "best_epoch": candidate.best_epoch,
                           "valid_mae": metrics["valid"]["mae"],
                           **{f"test_{m}": metrics["test"][m] for m in REPORTED}})
        trials.sort(key=lambda t: t["valid_mae"])
        best = trials[0]
        best_config = yaml.safe_load((best["folder"] / "config.yaml").read_text())
        best_config.pop("data_spec", None)
        best_config["epochs"] = args.epochs

        variants = [("full", {})] + args.ablation
        jobs = []
        for label, overrides in variants:
            for seed in range(args.seeds):
                config = {**best_config, "seed": seed, "out": str(Path(scratch) / "ablation" / f"{label}-{seed}"),
                          "model_config": {**best_config["model_config"], **overrides}}
                jobs.append((label, config))
        started = time.perf_counter()
        with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(train_one, [config for _, config in jobs]))
        ablation_seconds = time.perf_counter() - started
        ablation = {label: summarise([r for (name, _), r in zip(jobs, results) if name == label])
                    for label, _ in variants}
        ablation_settings = {label: overrides for label, overrides in variants}

    for t in trials:
        t.pop("folder")
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "data": args.data, "model": args.model,
        "trials": args.trials, "max_epochs": args.epochs, "sweep_seconds": round(sweep_seconds, 1),
        "states": {k: getattr(row, k) for k in ("complete", "pruned", "failed")},
        "best_trial": {**best, "beats_reference": {
            "mae": best["test_mae"] < reference["mae"], "acc2_non0": best["test_acc2_non0"] > reference["acc2_non0"]}},
        "reference": reference, "best_config": best_config["model_config"] | {
            k: best_config[k] for k in ("lr", "weight_decay", "batch_size")},
        "trials_by_valid": trials, "ablation_settings": ablation_settings, "ablation": ablation,
        "ablation_seconds": round(ablation_seconds, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
