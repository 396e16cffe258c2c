"""Platform overhead: the same N trials x E epochs through `msa sweep` (Ray Tune + Optuna +
DeepSpeed, one worker per trial, one trial at a time, no early stopping) and through a bare
in-process PyTorch loop over the very configs the sweep drew. Prints one JSON object.

    .venv/bin/python benchmarks/sweep_overhead.py --data ../shared/data/mosi_lite.npz --model tfn --trials 3 --epochs 30
    ... --train-actors   # one-worker trials through a Ray Train TorchTrainer instead of inline
    ... --rounds 3       # sweep, bare, sweep, bare, ...: one ratio per round, and their median

The sweep is `run_sweep` from a process without Ray, as `msa sweep` runs it: Ray starts inside
it, beside the sweep's MLflow server, and its start counts. On a small shared machine the same
bare loop can take 1.5x longer from one minute to the next, so a single round's ratio is noisy:
rounds alternate the two arms, and each round's ratio compares neighbours.

Where the time goes, per trial (means):
- `training_s`: the epochs as timed inside train_loop (forward, backward, step, valid
  prediction, and on improving epochs test prediction and the best-checkpoint write);
- `report_s`: per epoch, saving the resumable state and reporting it to Tune (Tune's
  `time_this_iter_s` minus the epoch, summed over epochs after the first);
- `setup_s`: from the trainable's start to its first report, minus the first epoch
  (DeepSpeed import, process group, model, `deepspeed.initialize`, data to tensors; with
  `--train-actors` also the Train controller and worker start);
- `start_s`: the rest (Ray's and the MLflow server's start, Tune starting the trial actor and
  importing the platform, scheduling, each study's close and registration), per trial.
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

import torch


def bare_run(params: dict, dataset, epochs: int, seed: int) -> float:
    """The same model, optimizer and batches as train_loop, with no Ray, DeepSpeed or checkpoints."""
    from msa.models.registry import build_model
    from msa.platform.training.engine import seed_everything
    from msa.platform.training.predict import SplitTensors, predict, task_loss

    seed_everything(seed)
    model_config = {k.split("/", 1)[1]: v for k, v in params.items() if k.startswith("model_config/")}
    model = build_model(params["model"], dataset.spec, model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params["lr"], weight_decay=params["weight_decay"])
    splits = {n: SplitTensors(s, torch.device("cpu"), torch.float32, dataset.task) for n, s in dataset.splits.items()}
    order = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for _ in range(epochs):
        model.train()
        permutation = torch.randperm(splits["train"].size, generator=order)
        for start in range(0, len(permutation), params["batch_size"]):
            features, lengths, labels = splits["train"].batch(permutation[start : start + params["batch_size"]])
            loss = task_loss(model(features, lengths, labels).prediction, labels, dataset.task, "l1")
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        predict(model, splits["valid"].features, splits["valid"].lengths, dataset.task, params["batch_size"])
    return time.perf_counter() - started


def trial_phases(run_dir: Path) -> dict[str, float]:
    """Totals over all trials, from Tune's per-report timings (see the module docstring)."""
    totals = {"training_s": 0.0, "setup_s": 0.0, "report_s": 0.0}
    for result_file in (run_dir / "ray").rglob("result.json"):
        results = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        totals["training_s"] += sum(r["epoch_seconds"] for r in results)
        totals["setup_s"] += results[0]["time_this_iter_s"] - results[0]["epoch_seconds"]
        totals["report_s"] += sum(r["time_this_iter_s"] - r["epoch_seconds"] for r in results[1:])
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="baseline")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--cpus-per-worker", type=float, default=os.cpu_count(),
                        help="the trial's CPUs (Ray sets its torch threads to this); default: all, as the bare loop")
    parser.add_argument("--train-actors", action="store_true",
                        help="run one-worker trials through a TorchTrainer (resources.inline_single_worker=false)")
    parser.add_argument("--rounds", type=int, default=1, help="sweep-then-bare rounds (default 1)")
    args = parser.parse_args()
    rounds = [one_round(args) for _ in range(args.rounds)]
    print(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, "
                   f"{'cuda ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}",
        "model": args.model, "data": Path(args.data).name, "trials": args.trials, "epochs": args.epochs,
        "cpus_per_trial": args.cpus_per_worker,
        "trial_path": "TorchTrainer (controller + 1 worker actor)" if args.train_actors else "inline in the Tune trial",
        "rounds": rounds,
        "median_ratio_platform_over_bare": round(statistics.median(r["ratio_platform_over_bare"] for r in rounds), 3),
    }, indent=2))


def one_round(args) -> dict:
    """One sweep, then the bare loop over the configs it drew."""
    import optuna

    from msa.platform.core.config import build_dataclass
    from msa.platform.data.readers import load_dataset
    from msa.platform.sweep.config import SweepConfig, validate_sweep_config
    from msa.platform.sweep.driver import run_sweep

    with tempfile.TemporaryDirectory() as storage:
        config = validate_sweep_config(build_dataclass(SweepConfig, {
            "name": "overhead", "datasets": [str(Path(args.data).resolve())], "models": [args.model],
            "budget": {"trials_per_pair": args.trials, "max_epochs": args.epochs},
            "search": {"sampler": "random", "seed": 0, "scheduler": "none"},
            "resources": {"workers_per_trial": 1, "cpus_per_worker": args.cpus_per_worker, "max_concurrent_trials": 1,
                          "inline_single_worker": not args.train_actors},
            "storage": storage, "train": {"patience": args.epochs},
        }, where="bench"), where="bench")
        started = time.perf_counter()
        run_sweep(config)
        platform_s = time.perf_counter() - started
        (run_dir,) = Path(storage).glob("overhead-*")
        (db,) = (run_dir / "optuna").glob("*.db")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        trials = optuna.load_study(study_name=db.stem, storage=f"sqlite:///{db}").trials
        phases = trial_phases(run_dir)

    dataset = load_dataset(args.data)
    bare_s = sum(bare_run({**t.params, "model": args.model}, dataset, args.epochs, seed=0) for t in trials)
    return {
        "platform_wall_s": round(platform_s, 1),
        "platform_training_s": round(phases["training_s"], 1),
        "bare_loop_s": round(bare_s, 1),
        "per_trial_mean_s": {
            "platform": round(platform_s / args.trials, 1),
            "bare": round(bare_s / args.trials, 1),
            **{name: round(value / args.trials, 2) for name, value in phases.items()},
            "start_s": round((platform_s - sum(phases.values())) / args.trials, 2),
        },
        "ratio_platform_over_bare": round(platform_s / bare_s, 2),
        "ratio_epochs_over_bare": round(phases["training_s"] / bare_s, 2),
    }


if __name__ == "__main__":
    main()
