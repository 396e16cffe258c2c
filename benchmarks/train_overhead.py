"""Measure the in-process training path: import and DeepSpeed start-up costs, then training and
evaluation throughput of a model, on a real or synthetic dataset. Prints one JSON object.

    .venv/bin/python benchmarks/train_overhead.py --data ../shared/data/mosi_lite.npz --model baseline

Start-up is measured in a fresh process (the first `import deepspeed` and the first
`deepspeed.initialize` are what every new trial worker pays); throughput is training samples per
second over `--epochs` full epochs at `--batch-size`, after one warm-up epoch: of the optimisation
steps alone (`training_samples_per_s`), and of whole epochs with their valid prediction and
checkpoint (`train_eval_samples_per_s`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="baseline")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    started = time.perf_counter()
    from msa.platform.data.readers import load_dataset
    from msa.platform.training.engine import ensure_process_group, import_deepspeed
    from msa.platform.training.loop import train_loop

    import_msa_s = time.perf_counter() - started
    started = time.perf_counter()
    deepspeed = import_deepspeed(torch.cuda.is_available())
    import_deepspeed_s = time.perf_counter() - started
    started = time.perf_counter()
    ensure_process_group(deepspeed, torch.cuda.is_available())
    process_group_s = time.perf_counter() - started
    started = time.perf_counter()
    dataset = load_dataset(args.data)
    load_data_s = time.perf_counter() - started

    epoch_seconds: list[float] = []
    training_seconds: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        train_loop(
            {"model": args.model, "data": args.data, "out": str(Path(tmp) / "run"), "epochs": args.epochs + 1,
             "patience": args.epochs + 1, "batch_size": args.batch_size},
            dataset=dataset,
            on_epoch=lambda record, _save_state: (epoch_seconds.append(record["epoch_seconds"]),
                                                  training_seconds.append(record["training_seconds"])),
        )
        train_loop_s = time.perf_counter() - started
    measured, training = epoch_seconds[1:], training_seconds[1:]  # the first epoch warms up allocators and kernels
    n_train = len(dataset.splits["train"])
    print(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}, "
                   f"{'cuda ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}",
        "model": args.model, "data": Path(args.data).name, "train_clips": n_train, "batch_size": args.batch_size,
        "import_msa_s": round(import_msa_s, 2), "import_deepspeed_s": round(import_deepspeed_s, 2),
        "process_group_s": round(process_group_s, 2), "load_data_s": round(load_data_s, 2),
        "train_loop_total_s": round(train_loop_s, 2),
        "epoch_s_mean": round(sum(measured) / len(measured), 3),
        "train_eval_samples_per_s": round(n_train / (sum(measured) / len(measured)), 1),
        "training_samples_per_s": round(n_train / (sum(training) / len(training)), 1),
    }, indent=2))


if __name__ == "__main__":
    main()
