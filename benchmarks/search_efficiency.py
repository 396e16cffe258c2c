"""Search efficiency, unpaired: random, random + ASHA, TPE and TPE + ASHA, each with its own seeds.

Every run is a real one-dataset sweep through `run_sweep` (Ray Tune, Optuna, DeepSpeed). The
arms without ASHA run N trials of E epochs (no early stopping): budget B = N x E trial-epochs.
The ASHA arms may start up to `--asha-trial-factor` x N trials of at most E epochs. No two runs
share a sampler seed (run k of arm a uses seed 1000 + 10 k + a), so TPE's random start-up
trials are never random search's own configs. ``search.defaults_first`` is off in every arm:
this measures the samplers and the scheduler; the default config's head start is measured by
`defaults_first.py`.

Each epoch report is a point of two curves, in the order the reports happened: best valid so
far against trial-epochs spent, and against training seconds spent (the sum of the trials'
`time_this_iter_s`). Per arm: the median and interquartile range of those curves over runs, and
the trial-epochs each run needs to reach random search's median final best (the target).
Writes every run and curve to `--out` (JSON) as it goes, and prints the summary tables.

    .venv/bin/python benchmarks/search_efficiency.py --data ../shared/data/mosi_lite.npz \\
        --runs 5 --trials 12 --epochs 20 --out /tmp/search_efficiency.json

Selection is on valid only; test is not looked at here.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

ARMS = {  # name: (sampler, scheduler)
    "random": ("random", "none"),
    "random + ASHA": ("random", "asha"),
    "TPE": ("tpe", "none"),
    "TPE + ASHA": ("tpe", "asha"),
}


def sweep_curve(run_dir: Path, mode: str) -> list[tuple[int, float, float]]:
    """(trial-epochs so far, training seconds so far, best so far) after every epoch report."""
    reports = []
    for result_file in (run_dir / "ray").rglob("result.json"):
        for line in result_file.read_text().splitlines():
            if line.strip():
                result = json.loads(line)
                metric = next(v for k, v in result.items() if k.startswith("best_valid_"))
                # Reports in one second are ordered by how long their trial had run (earlier first).
                reports.append((result["timestamp"], result["time_total_s"], result["time_this_iter_s"], metric))
    reports.sort()
    curve, best, seconds = [], math.nan, 0.0
    for spent, (_, _, this_iter, value) in enumerate(reports, start=1):
        seconds += this_iter
        if value == value and (best != best or (value < best if mode == "min" else value > best)):
            best = value
        curve.append((spent, round(seconds, 2), best))
    return curve


def best_within(curve, budget: float, axis: int = 0) -> float:
    """Best so far once `budget` trial-epochs (axis 0) or seconds (axis 1) were spent."""
    within = [point[2] for point in curve if point[axis] <= budget]
    return within[-1] if within else math.nan


def cost_to_reach(curve, target: float, mode: str, budget: float, axis: int = 0) -> float:
    """Trial-epochs (or seconds) spent when the best first reached `target`; inf if not within budget."""
    for point in curve:
        if point[axis] > budget:
            break
        if point[2] <= target if mode == "min" else point[2] >= target:
            return point[axis]
    return math.inf


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """Median and interquartile range, interpolated between order statistics (inf: not reached, sorts last)."""
    ordered = sorted(values)

    def at(q: float) -> float:
        position = q * (len(ordered) - 1)
        low, high = ordered[math.floor(position)], ordered[math.ceil(position)]
        return low if low == high else low + (high - low) * (position - math.floor(position))
    return at(0.5), at(0.25), at(0.75)


def one_sweep(args, arm: str, seed: int) -> dict:
    from msa.platform.core.config import build_dataclass
    from msa.platform.sweep.config import SweepConfig, validate_sweep_config
    from msa.platform.sweep.driver import run_sweep

    sampler, scheduler = ARMS[arm]
    trials = args.trials * (args.asha_trial_factor if scheduler == "asha" else 1)
    with tempfile.TemporaryDirectory() as storage:
        config = validate_sweep_config(build_dataclass(SweepConfig, {
            "name": "eff", "datasets": [str(args.data.resolve())], "models": [args.model],
            "budget": {"trials_per_pair": trials, "max_epochs": args.epochs},
            "search": {"sampler": sampler, "seed": seed, "scheduler": scheduler, "defaults_first": False,
                       "grace_period": args.grace_period, "reduction_factor": args.reduction_factor,
                       **({"spaces": {args.model: str(args.space.resolve())}} if args.space else {})},
            "resources": {"cpus_per_worker": 1, "max_concurrent_trials": args.concurrent},
            "storage": storage, "train": {"patience": args.epochs, **args.train},
        }, where="bench"), where="bench")
        started = time.perf_counter()
        (pair,) = run_sweep(config).pairs
        (run_dir,) = Path(storage).glob("eff-*")
        return {"arm": arm, "seed": seed, "metric": pair.metric, "mode": pair.mode,
                "wall_s": round(time.perf_counter() - started, 1),
                "trials": {k: getattr(pair, k) for k in ("trials", "complete", "pruned", "failed")},
                "curve": sweep_curve(run_dir, pair.mode)}


def summarise(runs: list[dict], budget: int) -> dict:
    mode = runs[0]["mode"]
    target = statistics.median(best_within(r["curve"], budget) for r in runs if r["arm"] == "random")
    seconds_budget = statistics.median(r["curve"][-1][1] for r in runs if r["arm"] == "random")
    summary = {"target": target, "budget_trial_epochs": budget, "random_median_seconds": seconds_budget, "arms": {}}
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        if not mine:
            continue
        summary["arms"][arm] = {
            "runs": len(mine),
            "trial_epochs_to_target": quartiles([cost_to_reach(r["curve"], target, mode, budget) for r in mine]),
            "reached": sum(cost_to_reach(r["curve"], target, mode, budget) < math.inf for r in mine),
            "seconds_to_target": quartiles([cost_to_reach(r["curve"], target, mode, math.inf, 1) for r in mine]),
            "best_by_trial_epochs": {f: quartiles([best_within(r["curve"], f * budget) for r in mine])
                                     for f in (0.1, 0.2, 0.4, 0.6, 0.8, 1.0)},
            "best_by_seconds": {f: quartiles([best_within(r["curve"], f * seconds_budget, 1) for r in mine])
                                for f in (0.1, 0.2, 0.4, 0.6, 0.8, 1.0)},
            "trial_epochs_spent": quartiles([r["curve"][-1][0] for r in mine]),
        }
    return summary


def print_tables(summary: dict) -> None:
    def band(q, digits=4):
        return "not reached" if q[0] == math.inf else f"{q[0]:.{digits}f} [{q[1]:.{digits}f}, {q[2]:.{digits}f}]"

    budget = summary["budget_trial_epochs"]
    print(f"\ntarget (random search's median final best): {summary['target']:.4f}; budget {budget} trial-epochs")
    print("| arm | runs | reached | trial-epochs to target | fraction of budget | training s to target |")
    print("| --- | ---: | ---: | --- | --- | --- |")
    for arm, s in summary["arms"].items():
        fraction = tuple(v / budget for v in s["trial_epochs_to_target"])
        print(f"| {arm} | {s['runs']} | {s['reached']}/{s['runs']} | {band(s['trial_epochs_to_target'], 0)} "
              f"| {band(fraction, 3)} | {band(s['seconds_to_target'], 0)} |")
    for key, unit in (("best_by_trial_epochs", f"of {budget} trial-epochs"),
                      ("best_by_seconds", f"of {summary['random_median_seconds']:.0f} training s")):
        fractions = next(iter(summary["arms"].values()))[key]
        print(f"\nbest valid so far, median [IQR], at a fraction {unit}")
        print("| arm | " + " | ".join(f"{f:.0%}" for f in fractions) + " |")
        print("| --- |" + " --- |" * len(fractions))
        for arm, s in summary["arms"].items():
            print(f"| {arm} | " + " | ".join(band(q) for q in s[key].values()) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--model", default="baseline")
    parser.add_argument("--space", type=Path, help="search-space YAML (default: the model's)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--runs", type=int, default=5, help="independent runs per arm")
    parser.add_argument("--trials", type=int, default=12, help="N: trials of the arms without ASHA")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--asha-trial-factor", type=int, default=4)
    parser.add_argument("--grace-period", type=int, default=2)
    parser.add_argument("--reduction-factor", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--train", type=json.loads, default={}, help="JSON: extra `train:` keys")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import ray

    from msa.platform.sweep.cluster import TRIAL_SLOT

    budget = args.trials * args.epochs
    record = {"machine": f"{platform.machine()}, {os.cpu_count()} cpus", "model": args.model,
              "data": args.data.name, "trials": args.trials, "epochs": args.epochs,
              "asha": {"grace_period": args.grace_period, "reduction_factor": args.reduction_factor,
                       "trial_factor": args.asha_trial_factor},
              "concurrent_trials": args.concurrent, "runs": []}
    started = time.perf_counter()
    ray.init(resources={TRIAL_SLOT: args.concurrent}, dashboard_host="127.0.0.1", logging_level="WARNING")
    try:
        for k in range(args.runs):  # arms interleaved, so a slow stretch of the machine hits them all
            for arm in args.arms:
                record["runs"].append(one_sweep(args, arm, 1000 + 10 * k + list(ARMS).index(arm)))
                record["wall_s"] = round(time.perf_counter() - started, 1)
                args.out.write_text(json.dumps(record, indent=1))
    finally:
        ray.shutdown()
    record["summary"] = summarise(record["runs"], budget)
    args.out.write_text(json.dumps(record, indent=1))
    print_tables(record["summary"])


if __name__ == "__main__":
    main()
