"""Search efficiency: TPE + ASHA against random search at an equal trial-epoch budget.

For each seed, two real sweeps on one dataset and model through `run_sweep` (Ray Tune, Optuna,
DeepSpeed): random search with N trials of E epochs and no early stopping (budget B = N x E
trial-epochs), and TPE + ASHA with up to `--tpe-trial-factor` x N trials of at most E epochs.
Every epoch report is a point on a curve of (trial-epochs spent so far, best valid metric so
far), in the order the reports happened. Prints one JSON object:

- `random_best`: random search's best valid metric after its whole budget;
- `tpe_asha_epochs_to_match`: trial-epochs TPE + ASHA spent before its best first matched that
  (null: not within B), and `fraction_of_budget` = that / B (target <= 0.6);
- `tpe_asha_best_at_60pct` and `tpe_asha_best_at_budget`: its best after 0.6 B and B trial-epochs.

    .venv/bin/python benchmarks/search_efficiency.py --data ../shared/data/mosi_lite.npz --seeds 0 1 2

Selection is on valid only; test is not looked at here.
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


def sweep_curve(run_dir: Path, mode: str) -> list[tuple[int, float]]:
    """(trial-epochs so far, best so far) after every epoch report of every trial, in time order."""
    reports = []
    for result_file in (run_dir / "ray").rglob("result.json"):
        for line in result_file.read_text().splitlines():
            if line.strip():
                result = json.loads(line)
                metric = next(v for k, v in result.items() if k.startswith("best_valid_"))
                # Reports in one second are ordered by how long their trial had run (earlier first).
                reports.append((result["timestamp"], result["time_total_s"], metric))
    reports.sort()
    curve, best = [], None
    for spent, (_, _, value) in enumerate(reports, start=1):
        if value == value and (best is None or (value < best if mode == "min" else value > best)):
            best = value
        curve.append((spent, best))
    return curve


def best_within(curve: list[tuple[int, float]], budget: float) -> float | None:
    within = [best for spent, best in curve if spent <= budget]
    return within[-1] if within else None


def epochs_to_match(curve: list[tuple[int, float]], target: float, mode: str, budget: int) -> int | None:
    for spent, best in curve:
        if spent > budget:
            return None
        if best is not None and (best <= target if mode == "min" else best >= target):
            return spent
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="baseline")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--random-trials", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=18)
    parser.add_argument("--tpe-trial-factor", type=int, default=4)
    parser.add_argument("--grace-period", type=int, default=2)
    parser.add_argument("--reduction-factor", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=2)
    args = parser.parse_args()

    import ray

    from msa.platform.core.config import build_dataclass
    from msa.platform.sweep.cluster import TRIAL_SLOT
    from msa.platform.sweep.config import SweepConfig, validate_sweep_config
    from msa.platform.sweep.driver import run_sweep

    budget = args.random_trials * args.epochs
    started = time.perf_counter()
    ray.init(resources={TRIAL_SLOT: args.concurrent}, dashboard_host="127.0.0.1")
    per_seed = []
    try:
        for seed in args.seeds:
            curves = {}
            for method, sampler, scheduler, trials in (
                ("random", "random", "none", args.random_trials),
                ("tpe_asha", "tpe", "asha", args.tpe_trial_factor * args.random_trials),
            ):
                with tempfile.TemporaryDirectory() as storage:
                    config = validate_sweep_config(build_dataclass(SweepConfig, {
                        "name": method, "datasets": [str(Path(args.data).resolve())], "models": [args.model],
                        "budget": {"trials_per_pair": trials, "max_epochs": args.epochs},
                        "search": {"sampler": sampler, "seed": seed, "scheduler": scheduler,
                                   "grace_period": args.grace_period, "reduction_factor": args.reduction_factor},
                        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1,
                                      "max_concurrent_trials": args.concurrent},
                        "storage": storage, "train": {"patience": args.epochs},
                    }, where="bench"), where="bench")
                    (row,) = run_sweep(config).pairs
                    (run_dir,) = Path(storage).glob(f"{method}-*")
                    curves[method] = (sweep_curve(run_dir, row.mode), row)
            mode = curves["random"][1]["mode"]
            random_curve, tpe_curve = curves["random"][0], curves["tpe_asha"][0]
            random_best = random_curve[-1][1]
            matched = epochs_to_match(tpe_curve, random_best, mode, budget)
            tpe_row = curves["tpe_asha"][1]
            per_seed.append({
                "seed": seed, "metric": curves["random"][1]["metric"], "budget_trial_epochs": budget,
                "random_best": round(random_best, 4),
                "random_trial_epochs_spent": random_curve[-1][0],
                "tpe_asha_epochs_to_match": matched,
                "fraction_of_budget": None if matched is None else round(matched / budget, 3),
                "tpe_asha_best_at_60pct": round(best_within(tpe_curve, 0.6 * budget), 4),
                "tpe_asha_best_at_budget": round(best_within(tpe_curve, budget), 4),
                "tpe_asha_trial_epochs_spent": tpe_curve[-1][0],
                "tpe_asha_trials": {k: getattr(tpe_row, k) for k in ("trials", "complete", "pruned", "failed")},
            })
    finally:
        ray.shutdown()
    fractions = [s["fraction_of_budget"] for s in per_seed if s["fraction_of_budget"] is not None]
    print(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "model": args.model, "data": Path(args.data).name, "random_trials": args.random_trials,
        "epochs": args.epochs, "asha": {"grace_period": args.grace_period, "reduction_factor": args.reduction_factor},
        "concurrent_trials": args.concurrent, "wall_s": round(time.perf_counter() - started, 1),
        "seeds": per_seed,
        "matched_within_budget": f"{len(fractions)}/{len(per_seed)}",
        "median_fraction_of_budget_when_matched": statistics.median(fractions) if fractions else None,
    }, indent=2))


if __name__ == "__main__":
    main()
