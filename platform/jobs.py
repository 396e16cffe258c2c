"""The user-facing jobs, one documented function each: what every `msa` subcommand does once
its arguments are parsed (`cli.py` parses and dispatches, nothing more). They run in the `msa`
process, the driver; each validates its whole input before any work starts and raises
`MsaError` (one line, exit 2) for bad input.

`msa run CONFIG` is `run`: one sweep session (the run directory, the datasets loaded and hashed
once, one MLflow server), the sweep on Ray, then the ensembles and the leaderboard on that same
server and those same datasets, the leaderboard rendered once into the run directory and the
export folder.
"""
from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import numpy as np

from msa.ensembles.board_console import to_console
from msa.ensembles.build import build_ensembles
from msa.ensembles.config import EnsembleConfig, ensemble_config
from msa.ensembles.members import DatasetCache
from msa.models.registry import MODELS
from msa.platform.core.config import load_yaml_mapping, merge, parse_overrides, to_plain
from msa.platform.core.errors import MsaError
from msa.platform.core.files import atomic_write
from msa.platform.core.metrics import compute_metrics, direction
from msa.platform.core.run_dir import RunDir
from msa.platform.core.spec import MODALITIES
from msa.platform.data.features import FeatureSet
from msa.platform.data.readers import load_dataset, write_mmsa_pickle, write_npz
from msa.platform.data.synth import DEFAULT_DIMS, DEFAULT_MAX_LENGTHS, synthesize
from msa.platform.sweep.config import SweepConfig, load_sweep_config
from msa.platform.sweep.driver import SweepSession, run_sweep
from msa.platform.sweep.resume import resume_config
from msa.platform.tracking.aliases import promote as promote_version
from msa.platform.tracking.client import client
from msa.platform.tracking.registry import list_registered, load_registered, predict_splits, rank_versions
from msa.platform.tracking.server import MlflowServer, require_store, serving
from msa.platform.training.checkpoint import prediction_table
from msa.platform.training.config import resolve_config
from msa.platform.training.loop import train_seed_group
from msa.platform.training.progress import EpochProgress

ENSEMBLE_FLAGS = ("top_k", "protocol", "folds", "seeds", "caruana_steps", "bootstrap", "seed")


def load_job_config(path: str, overrides: list[str]) -> tuple[SweepConfig, EnsembleConfig]:
    """A sweep config and its `ensemble:` section, both validated (before Ray starts)."""
    config = load_sweep_config(path, overrides)
    return config, ensemble_config(config.ensemble, where=f"{path}" + (" + command-line overrides" if overrides else ""))


def train(args: argparse.Namespace) -> None:
    """`msa train`: one model (or, with ``seeds=n``, a seed group) trained in this process
    through DeepSpeed; shows its way through each epoch's batches on stderr (`progress.py`),
    prints each epoch, then per seed the selected epoch's valid and test metrics and where the
    checkpoint is."""
    values = load_yaml_mapping(args.config) if args.config else {}
    for key in ("model", "data", "out", "seed"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    values = merge(values, parse_overrides(args.overrides))
    where = " + ".join(filter(None, [args.config, "command-line overrides" if args.overrides else ""]))
    config = resolve_config(values, where=where or "train options")

    def show(record: dict[str, float], _save_state) -> None:
        metrics = "  ".join(f"{k[6:]} {v:.4g}" for k, v in record.items() if k.startswith("valid_"))
        mark = " *" if record["improved"] else ""
        print(f"epoch {int(record['epoch']):3d}  loss {record['train_loss']:.4f}  valid: {metrics}{mark}", flush=True)

    results = train_seed_group(config, on_epoch=show, progress=EpochProgress())
    for result in results:
        print(f"\n{'seed ' + str(result.out_dir.name.removeprefix('seed-')) + ': ' if len(results) > 1 else ''}"
              f"best epoch {result.best_epoch}, selected on valid {result.selection_metric}")
        print(f"{'metric':<16}{'valid':>10}{'test':>10}")
        for name in result.valid_metrics:
            print(f"{name:<16}{result.valid_metrics[name]:>10.4g}{result.test_metrics[name]:>10.4g}")
        print(f"checkpoint: {result.out_dir}  (weights sha256 {result.weights_sha256[:16]}...)")


def synth(args: argparse.Namespace) -> None:
    """`msa data synth`: the deterministic synthetic dataset, as an MMSA pickle or an .npz."""
    sizes = {"train": args.train, "valid": args.valid, "test": args.test}
    if min(sizes.values()) < 1:
        raise MsaError(f"split sizes must be >= 1, got {sizes}")
    out = Path(args.out)
    if out.suffix not in (".pkl", ".npz"):
        raise MsaError(f"--out {out}: use a .pkl (MMSA pickle) or .npz file name")
    dims = _per_modality(args.dims, "--dims") if args.dims else DEFAULT_DIMS
    lengths = _per_modality(args.lengths, "--lengths") if args.lengths else {}
    if set(lengths) - set(dims):
        raise MsaError(f"--lengths names {', '.join(sorted(set(lengths) - set(dims)))}, which the data has no "
                       f"features of (its modalities: {', '.join(dims)})")
    low, _, high = args.words.partition("-")
    if not (low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high)):
        raise MsaError(f"--words {args.words!r}: give MIN-MAX, e.g. 8-40")
    dataset = synthesize(args.task, seed=args.seed, sizes=sizes, dims=dims, words=(int(low), int(high)),
                         max_lengths={m: lengths.get(m, DEFAULT_MAX_LENGTHS.get(m, 30)) for m in dims})
    (write_npz if out.suffix == ".npz" else write_mmsa_pickle)(dataset, out)
    print(f"wrote {out}: {dataset.task}, " + ", ".join(f"{s} {len(v)}" for s, v in dataset.splits.items()))


def _per_modality(text: str, flag: str) -> dict[str, int]:
    """``text=768,audio=74`` as ``{"text": 768, "audio": 74}``.

    Raises:
        MsaError: naming `flag`, for anything else."""
    values = {}
    for part in text.split(","):
        modality, _, value = part.partition("=")
        if modality not in MODALITIES or not value.isdigit() or int(value) < 1:
            raise MsaError(f"{flag} {text!r}: give modality=positive integer pairs ({', '.join(MODALITIES)}), "
                           f"e.g. text=768,audio=74")
        values[modality] = int(value)
    return values


def inspect(args: argparse.Namespace) -> None:
    """`msa data inspect PATH`: splits, modalities, shapes and label statistics."""
    print(describe(load_dataset(args.path, replace_nonfinite=args.replace_nonfinite)))


def describe(dataset: FeatureSet) -> str:
    """A human summary of a dataset: what `msa data inspect` prints."""
    spec = dataset.spec
    lines = [
        f"dataset   {dataset.name}  ({dataset.source})",
        f"task      {dataset.task}, metric suite {dataset.metric_suite}"
        + (f", {len(dataset.class_names)} classes" if dataset.class_names else ""),
        "modalities " + ", ".join(f"{m} (T={spec.max_lengths[m]}, d={d})" for m, d in spec.dims.items()),
    ]
    for name, split in dataset.splits.items():
        lines.append(f"\n[{name}] {len(split)} clips")
        for m in split.features:
            n = split.lengths[m]
            lines.append(
                f"  {m:<7} shape {tuple(split.features[m].shape)}  lengths min {n.min()} mean {n.mean():.1f} max {n.max()}"
            )
        y = split.labels
        if dataset.task == "regression":
            lines.append(
                f"  labels  mean {y.mean():.3f} std {y.std():.3f} min {y.min():.3f} max {y.max():.3f}"
                f"  zero {int((y == 0).sum())}  positive {int((y > 0).sum())}  negative {int((y < 0).sum())}"
            )
        else:
            counts = np.bincount(y, minlength=len(dataset.class_names))
            present = int((counts > 0).sum())
            top = ", ".join(f"{dataset.class_names[i]} {counts[i]}" for i in np.argsort(-counts)[:3])
            lines.append(f"  labels  {present}/{len(counts)} classes present; most frequent: {top}")
        if split.unimodal_labels:
            lines.append("  unimodal labels: " + ", ".join(split.unimodal_labels))
    return "\n".join(lines)


def models(args: argparse.Namespace) -> None:
    """`msa models`: the model registry."""
    for name, entry in MODELS.items():
        print(f"{name:<12}{entry.summary}")


def sweep(args: argparse.Namespace) -> None:
    """`msa sweep CONFIG` or `msa sweep --resume RUN_DIR`: run or resume a sweep, print its summary."""
    if args.resume:
        run_dir = Path(args.resume).resolve()
        config_path, overrides = args.config, args.overrides
        if config_path and "=" in config_path and not Path(config_path).exists():  # only overrides given
            config_path, overrides = None, [config_path, *overrides]
        config = resume_config(run_dir, config_path, overrides)
        ensemble_config(config.ensemble, where=str(RunDir(run_dir).config_file))
    else:
        if not args.config:
            raise MsaError("msa sweep: give a sweep config (e.g. sweeps/demo.yaml) or --resume RUN_DIR")
        config, _ = load_job_config(args.config, args.overrides)
        run_dir = None
    if args.dry_run:
        print(SweepSession(config, resume_dir=run_dir, address=args.address).plan())
        return
    result = run_sweep(config, resume_dir=run_dir, address=args.address, verbose=args.verbose)
    print("\n" + result.table())


def ensemble_options(args: argparse.Namespace, run_dir: Path | None) -> EnsembleConfig:
    """The run's `ensemble:` settings (or the defaults), with the flags given on top."""
    values = to_plain(EnsembleConfig())
    if run_dir is not None and RunDir(run_dir).is_sweep():
        values.update(load_yaml_mapping(RunDir(run_dir).config_file).get("ensemble") or {})
    for key in ENSEMBLE_FLAGS:
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.learners is not None:
        values["learners"] = [name.strip() for name in args.learners.split(",") if name.strip()]
    if args.no_register:
        values["register"] = False
    return ensemble_config(values, where="ensemble options")


def ensemble(args: argparse.Namespace) -> None:
    """`msa ensemble RUN_DIR` (or `--experiment`): stacked ensembles and their leaderboard."""
    run_dir = Path(args.run_dir).resolve() if args.run_dir else None
    if run_dir is None and not args.experiment:
        raise MsaError("msa ensemble: give a sweep RUN_DIR, or --experiment NAME with --tracking-uri and --out")
    out = Path(args.out).resolve() if args.out else None
    board = build_ensembles(ensemble_options(args, run_dir), run_dir=run_dir, experiment=args.experiment,
                            tracking_uri=args.tracking_uri, out_dir=out)
    print(to_console(board, out or RunDir(run_dir).ensembles_dir))


def run(args: argparse.Namespace) -> None:
    """`msa run CONFIG`: the whole pipeline. One sweep session holds the run directory, the
    datasets (loaded and hashed once) and one MLflow server for both halves: the sweep, then the
    ensembles of its best trials, then the leaderboard (written into ``<run dir>/ensembles/``
    and, with ``--export DIR``, into DIR too)."""
    config, options = load_job_config(args.config, args.overrides)
    if args.dry_run:
        print(SweepSession(config, address=args.address).plan())
        return
    export = Path(args.export).resolve() if args.export else None
    with SweepSession(config, address=args.address, verbose=args.verbose) as session:
        result = session.run()
        print("\n" + result.table())
        if export is not None:
            export.mkdir(parents=True, exist_ok=True)
        datasets = DatasetCache(list(session.datasets.values()))
        board = build_ensembles(options, run_dir=result.run_dir.root, tracking_uri=session.tracking_uri,
                                datasets=datasets, export=export)
    print(to_console(board, export or result.run_dir.ensembles_dir))


def mlflow(args: argparse.Namespace) -> None:
    """`msa mlflow RUN_DIR`: the MLflow UI over a run directory's store until Ctrl-C (which stops
    the server, at any moment, before the command returns)."""
    run_dir = Path(args.run_dir).resolve()
    if not RunDir(run_dir).is_sweep():
        raise MsaError(f"{run_dir} is not a sweep run directory (no sweep.yaml)")
    require_store(run_dir)
    with MlflowServer(run_dir, host=args.host, port=args.port) as server:
        print(f"MLflow UI for {run_dir}: http://{args.host}:{server.port}  (Ctrl-C stops it)", flush=True)
        while server.process.poll() is None:
            time.sleep(1)
    raise MsaError(f"mlflow server stopped by itself (status {server.process.returncode}); see {server.log_path}")


def _tracking_uri(args: argparse.Namespace):
    """The tracking server to talk to while the block runs: --run-dir (its store, served),
    --tracking-uri, or $MLFLOW_TRACKING_URI (checked)."""
    if args.run_dir:
        return serving("", Path(args.run_dir).resolve())
    return serving(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""), None)


def registry(args: argparse.Namespace) -> None:
    """`msa registry`: every registered msa-* model version with its metrics; with `--dataset`,
    that dataset's versions ranked on valid across sweeps."""
    with _tracking_uri(args) as uri:
        if args.dataset:
            _print_ranking(args.dataset, rank_versions(uri, args.dataset))
            return
        rows = list_registered(uri)
    if not rows:
        print(f"no msa-* models registered at {uri}")
        return
    print(f"{'name':<36}{'version':>8}  {'aliases':<11}{'seeds':<7}{'valid':<18}{'test':<40}run")
    for row in rows:
        valid = _scores((k, v) for k, v in row["valid"].items() if k == row["selection_metric"])
        test = _scores(list(row["test"].items())[:3])
        print(f"{row['name']:<36}{row['version']:>8}  {row['aliases']:<11}{_seed_count(row):<7}{valid:<18}{test:<40}"
              f"{row['run_id']} ({row['sweep']})")


def _scores(scores) -> str:
    return "  ".join(f"{k} {'-' if v is None else format(v, '.4g')}" for k, v in scores)


def _seed_count(row: dict) -> str:
    return str(len(row["seeds"].split(","))) if row["seeds"] else "1"


def _print_ranking(dataset: str, ranked: list[list[dict]]) -> None:
    """One table per (data fingerprint, selection metric): rank, version, aliases, valid (+- sd
    over seeds), test, sweep, and why the version has its alias."""
    for rows in ranked:
        metric, fingerprint = rows[0]["selection_metric"], rows[0]["fingerprint"]
        print(f"{dataset}, data {fingerprint[:12] or 'unknown'}: {len(rows)} version(s) ranked on valid {metric} "
              f"({direction(metric) if metric else 'unknown'} is better)")
        print(f"{'rank':>4}  {'name':<32}{'version':>8}  {'aliases':<11}{'seeds':<6}{'valid':<20}{'test':<14}"
              f"{'sweep':<34}why")
        for rank, row in enumerate(rows, 1):
            value, sd = row["valid"].get(metric), row["sd_valid"].get(metric)
            valid = "-" if value is None else f"{value:.4g}" + (f" +- {sd:.2g}" if sd is not None else "")
            test = "-" if row["test"].get(metric) is None else f"{row['test'][metric]:.4g}"
            print(f"{rank:>4}  {row['name']:<32}{row['version']:>8}  {row['aliases'] or '-':<11}{_seed_count(row):<6}"
                  f"{valid:<20}{test:<14}{row['sweep'] or '-':<34}{row['reason'] or '-'}")


def promote(args: argparse.Namespace) -> None:
    """`msa registry promote NAME VERSION --reason R`: champion moved by hand, who and why recorded."""
    if args.dataset:
        raise MsaError("msa registry promote: --dataset does not apply (the name says the dataset)")
    with _tracking_uri(args) as uri:
        print(promote_version(client(uri), args.name, args.version, reason=args.reason, new_data=args.new_data))


def predict(args: argparse.Namespace) -> None:
    """`msa predict`: a registered model's predictions for a dataset's splits, as CSV, and their metrics."""
    out = Path(args.out)
    if not out.parent.is_dir():
        raise MsaError(f"--out {out}: folder {out.parent} does not exist")
    dataset = load_dataset(args.data, replace_nonfinite=args.replace_nonfinite)
    splits = list(dataset.splits) if args.split == "all" else [args.split]
    with _tracking_uri(args) as uri:
        model = load_registered(args.model, uri)
        predictions = predict_splits(model, dataset, splits, what=f"data {args.data}")

    def write(path: Path) -> None:
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            for number, name in enumerate(splits):  # the checkpoint's predictions CSV, with a split column
                header, rows = prediction_table(dataset.splits[name], predictions[name], dataset.class_names)
                if number == 0:
                    writer.writerow(["split", *header])
                writer.writerows([name, *row] for row in rows)

    atomic_write(out, write)
    print(f"wrote {out}: {sum(len(dataset.splits[n]) for n in splits)} predictions of {args.model}")
    for name in splits:
        metrics = compute_metrics(dataset.metric_suite, predictions[name], dataset.splits[name].labels)
        print(f"[{name}] " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
