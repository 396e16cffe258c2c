"""The `msa` command line: one entry point whose subcommands are the user-facing jobs.

* ``msa train``: train one model in-process through DeepSpeed and print its metrics.
* ``msa data synth``: write the deterministic synthetic dataset (MMSA pickle, or .npz).
* ``msa data inspect PATH``: splits, modalities, shapes and label statistics of a dataset.
* ``msa models``: the model registry.
* ``msa mlflow RUN_DIR``: the MLflow UI over a sweep's tracking store, until Ctrl-C.
* ``msa registry``: the msa-* models in the MLflow model registry, with valid/test metrics.
* ``msa predict``: predictions of a registered model (``models:/NAME@champion``) for a dataset.

Bad input ends with one line ``msa: error: ...`` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import os
import sys
from pathlib import Path

import numpy as np

from msa.platform.errors import MsaError


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (no usage block) with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise MsaError(f"{self.prog}: {message}")


def _train(args: argparse.Namespace) -> None:
    from msa.platform.config import load_yaml_mapping, merge, parse_overrides
    from msa.platform.train import resolve_config, train_loop

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

    result = train_loop(config, on_epoch=show)
    print(f"\nbest epoch {result.best_epoch}, selected on valid {result.selection_metric}")
    print(format_metrics_table(result.valid_metrics, result.test_metrics))
    print(f"checkpoint: {result.out_dir}  (weights sha256 {result.weights_sha256[:16]}...)")


def format_metrics_table(valid: dict[str, float], test: dict[str, float]) -> str:
    lines = [f"{'metric':<16}{'valid':>10}{'test':>10}"]
    for name in valid:
        lines.append(f"{name:<16}{valid[name]:>10.4g}{test[name]:>10.4g}")
    return "\n".join(lines)


def _synth(args: argparse.Namespace) -> None:
    from msa.platform.readers import write_mmsa_pickle, write_npz
    from msa.platform.synth import synthesize

    sizes = {"train": args.train, "valid": args.valid, "test": args.test}
    if min(sizes.values()) < 1:
        raise MsaError(f"split sizes must be >= 1, got {sizes}")
    out = Path(args.out)
    if out.suffix not in (".pkl", ".npz"):
        raise MsaError(f"--out {out}: use a .pkl (MMSA pickle) or .npz file name")
    dataset = synthesize(args.task, seed=args.seed, sizes=sizes)
    (write_npz if out.suffix == ".npz" else write_mmsa_pickle)(dataset, out)
    print(f"wrote {out}: {dataset.task}, " + ", ".join(f"{s} {len(v)}" for s, v in dataset.splits.items()))


def _inspect(args: argparse.Namespace) -> None:
    from msa.platform.readers import load_dataset

    print(describe(load_dataset(args.path, replace_nonfinite=args.replace_nonfinite)))


def describe(dataset) -> str:
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


def _sweep(args: argparse.Namespace) -> None:
    from msa.platform.sweep import format_summary, resume_config, run_sweep
    from msa.platform.sweep_config import load_sweep_config

    if args.resume:
        run_dir = Path(args.resume).resolve()
        config_path, overrides = args.config, args.overrides
        if config_path and "=" in config_path and not Path(config_path).exists():  # only overrides given
            config_path, overrides = None, [config_path, *overrides]
        config = resume_config(run_dir, config_path, overrides)
        rows = run_sweep(config, resume_dir=run_dir)
    else:
        if not args.config:
            raise MsaError("msa sweep: give a sweep config (e.g. sweeps/demo.yaml) or --resume RUN_DIR")
        config = load_sweep_config(args.config, args.overrides)
        rows = run_sweep(config)
    print("\n" + format_summary(rows))


def _mlflow(args: argparse.Namespace) -> None:
    import time

    from msa.platform.mlflow_server import MlflowServer

    run_dir = Path(args.run_dir).resolve()
    if not (run_dir / "sweep.yaml").is_file():
        raise MsaError(f"{run_dir} is not a sweep run directory (no sweep.yaml)")
    _require_store(run_dir)
    with MlflowServer(run_dir, host=args.host, port=args.port) as server:
        print(f"MLflow UI for {run_dir}: http://{args.host}:{server.port}  (Ctrl-C stops it)", flush=True)
        while server.process.poll() is None:
            time.sleep(1)
    raise MsaError(f"mlflow server stopped by itself (status {server.process.returncode}); see {server.log_path}")


def _require_store(run_dir: Path) -> Path:
    from msa.platform.mlflow_server import store_paths

    database, _ = store_paths(run_dir)
    if not database.is_file():
        raise MsaError(f"{run_dir} has no MLflow store ({database} does not exist)")
    return run_dir


@contextlib.contextmanager
def _tracking_uri(args: argparse.Namespace):
    """The tracking server to talk to: --run-dir (its store, served while the command runs),
    --tracking-uri, or $MLFLOW_TRACKING_URI."""
    from msa.platform.mlflow_server import MlflowServer, check_tracking_uri

    if args.run_dir:
        run_dir = _require_store(Path(args.run_dir).resolve())
        with MlflowServer(run_dir) as server:
            yield server.uri
        return
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise MsaError("no tracking server: pass --tracking-uri URI or --run-dir RUN_DIR, or set MLFLOW_TRACKING_URI")
    check_tracking_uri(uri)
    yield uri


def _registry(args: argparse.Namespace) -> None:
    from msa.platform.model_registry import list_registered

    with _tracking_uri(args) as uri:
        rows = list_registered(uri)
    if not rows:
        print(f"no msa-* models registered at {uri}")
        return
    print(f"{'name':<36}{'version':>8}  {'aliases':<10}{'valid':<18}{'test':<40}run")
    for row in rows:
        valid = "  ".join(f"{k} {v:.4g}" for k, v in row["valid"].items() if k == row["selection_metric"])
        test = "  ".join(f"{k} {v:.4g}" for k, v in list(row["test"].items())[:3])
        print(f"{row['name']:<36}{row['version']:>8}  {row['aliases']:<10}{valid:<18}{test:<40}{row['run_id']} ({row['sweep']})")


def _predict(args: argparse.Namespace) -> None:
    from msa.platform.metrics import compute_metrics
    from msa.platform.model_registry import load_registered, predict_splits
    from msa.platform.readers import atomic_write, load_dataset
    from msa.platform.train import prediction_table

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


def _models(args: argparse.Namespace) -> None:
    from msa.models.registry import MODELS

    for name, entry in MODELS.items():
        print(f"{name:<12}{entry.summary}")


def build_parser() -> argparse.ArgumentParser:
    from msa.models.registry import MODELS

    parser = OneLineParser(prog="msa", description="Sweeps and ensembles for multimodal sentiment analysis.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    train = commands.add_parser("train", help="train one model in-process through DeepSpeed")
    train.add_argument("--config", help="YAML file of train settings (see msa.platform.train.TrainConfig)")
    train.add_argument("--model", choices=sorted(MODELS), help="a registered model")
    train.add_argument("--data", help="dataset: .npz, MMSA .pkl, or MIntRec folder")
    train.add_argument("--out", help="output folder (must not exist)")
    train.add_argument("--seed", type=int)
    train.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. lr=3e-4 model_config.hidden=128")
    train.set_defaults(run=_train)

    data = commands.add_parser("data", help="create or inspect datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=OneLineParser)
    synth = data_commands.add_parser("synth", help="write the deterministic synthetic dataset")
    synth.add_argument("--task", choices=["regression", "classification"], default="regression")
    synth.add_argument("--out", required=True, help="output .pkl (MMSA schema) or .npz")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--train", type=int, default=600)
    synth.add_argument("--valid", type=int, default=200)
    synth.add_argument("--test", type=int, default=200)
    synth.set_defaults(run=_synth)
    inspect = data_commands.add_parser("inspect", help="print splits, modalities, shapes and label statistics")
    inspect.add_argument("path")
    inspect.add_argument("--replace-nonfinite", action="store_true", help="read NaN/inf features as 0")
    inspect.set_defaults(run=_inspect)

    sweep = commands.add_parser("sweep", help="run (or resume) a sweep: one Optuna study per model x dataset")
    sweep.add_argument("config", nargs="?", help="sweep YAML (see sweeps/demo.yaml)")
    sweep.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. budget.trials_per_pair=4")
    sweep.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted sweep")
    sweep.set_defaults(run=_sweep)

    mlflow = commands.add_parser("mlflow", help="serve the MLflow UI over a sweep run directory's tracking store")
    mlflow.add_argument("run_dir", metavar="RUN_DIR")
    mlflow.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    mlflow.add_argument("--port", type=int, default=5000)
    mlflow.set_defaults(run=_mlflow)

    def tracking_options(command: argparse.ArgumentParser) -> None:
        where = command.add_mutually_exclusive_group()
        where.add_argument("--tracking-uri", help="MLflow server (default: $MLFLOW_TRACKING_URI)")
        where.add_argument("--run-dir", help="a sweep run directory: serve its own MLflow store while this runs")

    registry = commands.add_parser("registry", help="list the msa-* models in the MLflow model registry")
    tracking_options(registry)
    registry.set_defaults(run=_registry)

    predict = commands.add_parser("predict", help="predict a dataset with a registered model")
    predict.add_argument("--model", required=True, help="e.g. models:/msa-baseline-mosi_lite@champion")
    predict.add_argument("--data", required=True, help="dataset: .npz, MMSA .pkl, or MIntRec folder")
    predict.add_argument("--out", required=True, help="CSV to write: split,id,label,prediction[,prob_<class>...]")
    predict.add_argument("--split", choices=["train", "valid", "test", "all"], default="test")
    predict.add_argument("--replace-nonfinite", action="store_true", help="read NaN/inf features as 0")
    tracking_options(predict)
    predict.set_defaults(run=_predict)

    models = commands.add_parser("models", help="list the registered models")
    models.set_defaults(run=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    # MLflow prints a progress bar per artifact download and two links per finished run.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:
        args = build_parser().parse_args(argv)
        args.run(args)
    except MsaError as exc:
        message = " ".join(str(exc).split())
        print(f"msa: error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("msa: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
