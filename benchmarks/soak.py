"""Soak: one sweep of N trials with faults drawn at random, then an audit of what survived.

The search space draws, per trial, an injected fault (`train.inject_fault`: none, raise, or
kill, where kill SIGKILLs the trial's training process) and a learning rate, of which 1e30
makes the loss NaN. Trials with a fault and a usable learning rate must be retried from their
checkpoint and complete. Trials with lr 1e30 must fail, for the NaN reason, recorded alike in
Ray, Optuna and MLflow. Every trial must be accounted for.

    .venv/bin/python benchmarks/soak.py --trials 50

Counted from the run's own records (the Optuna study, Ray's error files, the MLflow store):
- completed: COMPLETE in the study;
- retried: completed after at least one failed attempt (Ray's `error.txt`);
- failed: FAIL in the study (retries exhausted);
- lost: trials missing from any record or ending other than they must. That covers a
  trial the study lacks, a RUNNING leftover, an MLflow run that is missing or not closed or
  lacks an epoch, a checkpoint that does not verify, a fault that went unseen, and a failure
  for a reason other than its NaN. It must be 0.

Prints one JSON object (and the run directory).
"""
from __future__ import annotations

import argparse
import collections
import json
import platform
import tempfile
import time
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from msa.platform.core.run_dir import RunDir

NAN_LR = 1e30


def write_inputs(folder: Path, trials: int, epochs: int, seed: int, concurrent: int) -> Path:
    space = folder / "soak_space.yaml"
    space.write_text(yaml.safe_dump({
        "inject_fault": {"type": "categorical", "choices": ["none", "raise", "kill"]},
        "lr": {"type": "categorical", "choices": [1e-3, 3e-3, NAN_LR]},
    }))
    config = folder / "soak.yaml"
    config.write_text(yaml.safe_dump({
        "name": "soak", "storage": str(folder / "sweeps"), "datasets": ["synth_regression"], "models": ["baseline"],
        "train": {"patience": epochs, "inject_fault_epoch": 2},
        "budget": {"trials_per_pair": trials, "max_epochs": epochs},
        "search": {"sampler": "random", "seed": seed, "scheduler": "none", "spaces": {"baseline": str(space)}},
        "resources": {"workers_per_trial": 1, "max_concurrent_trials": concurrent, "max_failures": 1},
    }))
    return config


def failures(run_dir: Path, trial_id: str) -> list[str]:
    """The reason of each failed attempt, as Ray recorded it."""
    error_file = RunDir(run_dir).tune_experiment / trial_id / "error.txt"
    if not error_file.is_file():
        return []
    blocks = error_file.read_text(errors="replace").split("Failure # ")[1:]
    return [[line.strip() for line in block.strip().splitlines() if line.strip()][-1] for block in blocks]


def audit(run_dir: Path, trials: int, epochs: int) -> dict:
    from msa.platform.tracking.client import client
    from msa.platform.tracking.server import MlflowServer
    from msa.platform.training.checkpoint import Checkpoint

    (database,) = (run_dir / "optuna").glob("*.db")
    pair = database.stem
    study = optuna.load_study(study_name=pair, storage=f"sqlite:///{database}")
    counts = collections.Counter()
    lost: list[str] = []
    by_fault = collections.Counter()
    with MlflowServer(run_dir) as server:
        mlflow_client = client(server.uri)
        experiment = mlflow_client.get_experiment_by_name(run_dir.name)
        runs = {r.data.tags["ray_trial_id"]: r for r in mlflow_client.search_runs(
            [experiment.experiment_id], filter_string="tags.`msa.role` = 'trial'", max_results=10_000)}
        for trial in study.trials:
            trial_id = trial.user_attrs.get("ray_trial_id", "")
            fault, nan = trial.params.get("inject_fault"), trial.params.get("lr") == NAN_LR
            by_fault[f"{fault}{' + NaN lr' if nan else ''}"] += 1
            attempts = failures(run_dir, trial_id)
            run = runs.get(trial_id)

            def lose(why: str) -> None:
                lost.append(f"trial {trial.number} ({trial_id}, fault {fault}, lr {trial.params.get('lr')}): {why}")

            if run is None:
                lose("no MLflow run")
                continue
            if trial.state == TrialState.COMPLETE:
                counts["completed"] += 1
                counts["retried"] += bool(attempts)
                if nan:
                    lose("completed with a NaN learning rate")
                if fault != "none" and len(attempts) != 1:
                    lose(f"fault {fault} should fail exactly one attempt, Ray recorded {len(attempts)}")
                if run.info.status != "FINISHED":
                    lose(f"MLflow run {run.info.status}")
                try:
                    Checkpoint(run_dir / "trials" / pair / trial_id).verified_weights("soak")
                except Exception as error:  # noqa: BLE001 - any failure to verify is a loss
                    lose(str(error))
                steps = sorted(m.step for m in mlflow_client.get_metric_history(run.info.run_id, "train_loss"))
                if steps != list(range(1, epochs + 1)):
                    lose(f"MLflow epochs {steps}")
            elif trial.state == TrialState.FAIL:
                counts["failed"] += 1
                reason = trial.user_attrs.get("fail_reason", "")
                if not nan:
                    lose(f"failed without a NaN learning rate: {reason}")
                elif "training loss became nan" not in reason:
                    lose(f"failed for another reason: {reason}")
                if run.info.status != "FAILED" or run.data.tags.get("msa.fail_reason") != reason:
                    lose("MLflow does not record the same failure")
                if not attempts or attempts[-1] != reason:
                    lose("Ray does not record the same failure")
            else:
                lose(f"ended {trial.state.name}")
    missing = trials - len(study.trials)
    lost.extend(f"budget trial {i} never ran" for i in range(missing))
    return {"trials": trials, "in_study": len(study.trials), "completed": counts["completed"],
            "retried": counts["retried"], "failed": counts["failed"], "lost": len(lost),
            "drawn": dict(sorted(by_fault.items())), "lost_detail": lost}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="folder for the run (default: a temporary one)")
    args = parser.parse_args()

    from msa.platform.sweep.config import load_sweep_config
    from msa.platform.sweep.driver import run_sweep

    folder = args.out or Path(tempfile.mkdtemp(prefix="msa-soak-"))
    folder.mkdir(parents=True, exist_ok=True)
    config = write_inputs(folder, args.trials, args.epochs, args.seed, args.concurrent)
    started = time.monotonic()
    result = run_sweep(load_sweep_config(config))
    wall = time.monotonic() - started
    report = audit(result.run_dir.root, args.trials, args.epochs)
    print(json.dumps({"machine": f"{platform.node()} {platform.processor() or platform.machine()}",
                      "run_dir": str(result.run_dir.root), "wall_s": round(wall, 1), "epochs": args.epochs,
                      "concurrent": args.concurrent, "seed": args.seed, **report}, indent=2))


if __name__ == "__main__":
    main()
