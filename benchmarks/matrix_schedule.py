"""The whole matrix on shared slots, measured: the same sweep (2 models x 2 datasets, ASHA) run
with ``resources.schedule: sequential`` (one study after another, as separate Tune runs did)
and ``concurrent`` (every study at once), alternately, `--repeats` times each. Prints one JSON
object.

    .venv/bin/python benchmarks/matrix_schedule.py --repeats 3 --trials 16 --epochs 8

Slot utilisation = sum of trial seconds / (slots x matrix wall time), from Ray's own records:
a trial's seconds are its trainable's `time_total_s` in its last `result.json` row, ending at
that row's `timestamp` (whole seconds); the matrix wall time runs from the first trial's start
to the last one's end. The driver's wall time (Ray's start, the MLflow server, the last
registration included) is reported beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from msa.platform.core.run_dir import RunDir

MSA = str(Path(sys.executable).parent / "msa")


def trial_records(run_dir: Path) -> list[dict]:
    """Every trial of a sweep as Ray recorded it: pair, model, start and end (unix seconds), and
    per epoch its seconds and best valid metric so far; ``final``: it ran to its natural end
    (not stopped by ASHA). Reads this layout (``ray/sweep/``) and the one before (``ray/<pair>/``)."""
    records = []
    for result_file in sorted((run_dir / "ray").glob("*/*/result.json")):
        rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        if not rows:
            continue
        last, config = rows[-1], rows[-1]["config"]
        metric = f"best_valid_{config['selection_metric']}"
        records.append({
            "pair": config.get("msa_pair", result_file.parent.parent.name), "model": config["model"],
            "metric": config["selection_metric"], "start": last["timestamp"] - last["time_total_s"],
            "end": last["timestamp"], "seconds": last["time_total_s"],
            "epoch_seconds": [row["time_this_iter_s"] for row in rows], "curve": [row[metric] for row in rows],
            "final": bool(last.get("final")),
        })
    return records


def utilisation(records: list[dict], slots: int) -> dict:
    start, end = min(r["start"] for r in records), max(r["end"] for r in records)
    busy = sum(r["seconds"] for r in records)
    return {"matrix_wall_s": round(end - start, 1), "trial_s": round(busy, 1),
            "utilisation": round(busy / (slots * (end - start)), 3)}


def run_once(folder: Path, schedule: str, args, index: int) -> dict:
    config = {
        "name": f"{schedule}{index}", "storage": str(folder / "sweeps"),
        "datasets": ["synth_regression", "synth_classification"], "models": args.models,
        "budget": {"trials_per_pair": args.trials, "max_epochs": args.epochs},
        "search": {"sampler": "tpe", "seed": args.seed, "scheduler": "asha", "grace_period": 2, "reduction_factor": 2},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": args.cpus_per_slot, "max_concurrent_trials": args.slots,
                      "schedule": schedule},
        "train": {"patience": args.epochs},
    }
    path = folder / f"{schedule}{index}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.monotonic()
    done = subprocess.run([MSA, "sweep", str(path)], cwd=folder, capture_output=True, text=True, env=env)
    driver_s = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"{schedule} sweep failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    (run_dir,) = (folder / "sweeps").glob(f"{schedule}{index}-*")
    records = trial_records(run_dir)
    summary = json.loads(RunDir(run_dir).summary_json.read_text())
    return {"schedule": schedule, "driver_wall_s": round(driver_s, 1), **utilisation(records, args.slots),
            "trials": len(records), "trial_epochs": sum(len(r["curve"]) for r in records),
            "per_pair": {row["pair"]: {"trials": row["trials"], "best_valid": row["best_value"]} for row in summary},
            "console_lines": len(done.stdout.splitlines()) + len(done.stderr.splitlines()), "run_dir": str(run_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trials", type=int, default=16, help="trials per pair")
    parser.add_argument("--epochs", type=int, default=8, help="max epochs (ASHA's max_t)")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--cpus-per-slot", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", default=["tfn", "baseline"],
                        help="in the sweep's order: the slowest first, so the matrix ends on short trials")
    parser.add_argument("--schedules", nargs="+", default=["sequential", "concurrent"])
    parser.add_argument("--keep", type=Path, help="keep the run directories here (the simulation reads their curves)")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="matrix-"))
    folder.mkdir(parents=True, exist_ok=True)
    runs = []
    for index in range(args.repeats):
        for schedule in args.schedules:
            runs.append(run_once(folder, schedule, args, index))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "per_pair"}), file=sys.stderr, flush=True)
    by = {s: [r for r in runs if r["schedule"] == s] for s in args.schedules}
    report = {
        "machine": f"{platform.node()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv), "runs": runs,
        "mean": {s: {key: round(statistics.mean(r[key] for r in rs), 3) for key in ("driver_wall_s", "matrix_wall_s",
                                                                                     "utilisation")}
                 for s, rs in by.items()},
        "concurrent_faster_every_repeat": all(c["matrix_wall_s"] < s["matrix_wall_s"] and c["driver_wall_s"] < s["driver_wall_s"]
                                              for s, c in zip(by.get("sequential", []), by.get("concurrent", []))),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
