"""The `msa` command line: one entry point whose subcommands are the user-facing jobs.

* ``msa train``: train one model in-process through DeepSpeed and print its metrics.
* ``msa data synth``: write the deterministic synthetic dataset (MMSA pickle, or .npz).
* ``msa data inspect PATH``: splits, modalities, shapes and label statistics of a dataset.
* ``msa models``: the model registry.
* ``msa mlflow RUN_DIR``: the MLflow UI over a sweep's tracking store, until Ctrl-C.
* ``msa registry``: the msa-* models in the MLflow model registry, with valid/test metrics.
* ``msa predict``: predictions of a registered model (``models:/NAME@champion``) for a dataset.
* ``msa ensemble RUN_DIR``: stacked ensembles of a sweep's best trials and their leaderboard.
* ``msa leaderboard RUN_DIR --format csv|md|json|html``: the leaderboard, exported.
* ``msa run CONFIG``: the whole pipeline (sweep, ensembles, leaderboard).

``msa sweep`` and ``msa run`` take ``--address`` to run on a Ray cluster (README, "Running on a cluster").

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
        rows = run_sweep(config, resume_dir=run_dir, address=args.address)
    else:
        if not args.config:
            raise MsaError("msa sweep: give a sweep config (e.g. sweeps/demo.yaml) or --resume RUN_DIR")
        config = load_sweep_config(args.config, args.overrides)
        rows = run_sweep(config, address=args.address)
    print("\n" + format_summary(rows))


def _ensemble_options(args: argparse.Namespace, run_dir: Path | None):
    """The run's `ensemble:` settings (or the defaults), with the flags given on top."""
    from msa.platform.config import build_dataclass, load_yaml_mapping, to_plain
    from msa.platform.sweep_config import EnsembleConfig

    values = to_plain(EnsembleConfig())
    if run_dir is not None and (run_dir / "sweep.yaml").is_file():
        values.update(load_yaml_mapping(run_dir / "sweep.yaml").get("ensemble") or {})
    for key in ("top_k", "protocol", "folds", "seeds", "caruana_steps", "bootstrap", "seed"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.learners is not None:
        values["learners"] = [name.strip() for name in args.learners.split(",") if name.strip()]
    if args.no_register:
        values["register"] = False
    return build_dataclass(EnsembleConfig, values, where="ensemble options")


def _ensemble(args: argparse.Namespace) -> None:
    from msa.ensembles.build import build_ensembles

    run_dir = Path(args.run_dir).resolve() if args.run_dir else None
    if run_dir is None and not args.experiment:
        raise MsaError("msa ensemble: give a sweep RUN_DIR, or --experiment NAME with --tracking-uri and --out")
    board = build_ensembles(_ensemble_options(args, run_dir), run_dir=run_dir, experiment=args.experiment,
                            tracking_uri=args.tracking_uri, out_dir=Path(args.out).resolve() if args.out else None)
    _print_board(board, Path(args.out).resolve() if args.out else run_dir / "ensembles")


def _print_board(board: dict, folder: Path) -> None:
    """A compact leaderboard per dataset; the full one is in the written files."""
    for entry in board["datasets"]:
        metric = entry["selection_metric"]
        arrow = "lower" if entry["directions"][metric] == "lower" else "higher"
        print(f"\n[{entry['dataset']}] ranked by valid {metric} ({arrow} is better); "
              f"test difference vs best single with paired bootstrap 95% interval")
        print(f"{'#':>3}  {'name':<34}{'kind':<15}{'valid':>9}{'test':>9}  {'test diff [95% CI]':<28}registered")
        for rank, row in enumerate(entry["rows"], 1):
            diff = row["test_diff"][metric]
            interval = "-" if diff["diff"] is None else f"{diff['diff']:+.4f} [{diff['low']:+.4f}, {diff['high']:+.4f}]"
            print(f"{rank:>3}  {row['name']:<34}{row['kind']:<15}{_number(row['valid'][metric]):>9}"
                  f"{_number(row['test'][metric]):>9}  {interval:<28}{row['registered']}")
    print(f"\nleaderboard: {folder}/leaderboard.{{csv,md,json,html}}")


def _number(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _leaderboard(args: argparse.Namespace) -> None:
    from msa.ensembles.leaderboard import read_board, render
    from msa.platform.readers import atomic_write

    path = Path(args.path)
    if path.is_dir():
        path = path / "ensembles" / "leaderboard.json" if (path / "ensembles").is_dir() else path / "leaderboard.json"
    if not path.is_file():
        raise MsaError(f"no leaderboard at {path}; run msa ensemble RUN_DIR first")
    text = render(read_board(path), args.format)
    if args.out:
        out = Path(args.out)
        if not out.parent.is_dir():
            raise MsaError(f"--out {out}: folder {out.parent} does not exist")
        atomic_write(out, lambda tmp: tmp.write_text(text))
        print(f"wrote {out}")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _run(args: argparse.Namespace) -> None:
    from msa.ensembles.build import build_ensembles
    from msa.ensembles.leaderboard import write_all
    from msa.platform.sweep import format_summary, run_sweep
    from msa.platform.sweep_config import load_sweep_config

    config = load_sweep_config(args.config, args.overrides)
    export = Path(args.export).resolve() if args.export else None
    rows = run_sweep(config, address=args.address)
    print("\n" + format_summary(rows))
    run_dir = Path(rows[0]["run_dir"])
    board = build_ensembles(config.ensemble, run_dir=run_dir)
    folder = run_dir / "ensembles"
    if export is not None:
        export.mkdir(parents=True, exist_ok=True)
        write_all(board, export)
        folder = export
    _print_board(board, folder)


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

    def address_option(command: argparse.ArgumentParser) -> None:
        command.add_argument("--address", help="join a running Ray cluster: auto, HOST:PORT or ray://HOST:10001 "
                                                 "(default: $RAY_ADDRESS, else a private runtime on this machine)")

    sweep = commands.add_parser("sweep", help="run (or resume) a sweep: one Optuna study per model x dataset")
    sweep.add_argument("config", nargs="?", help="sweep YAML (see sweeps/demo.yaml)")
    sweep.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. budget.trials_per_pair=4")
    sweep.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted sweep")
    address_option(sweep)
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

    run = commands.add_parser("run", help="the whole pipeline: sweep, ensembles, leaderboard")
    run.add_argument("config", help="sweep YAML (its ensemble: section configures the ensembles)")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. ensemble.top_k=3")
    run.add_argument("--export", metavar="DIR", help="also write leaderboard.{csv,md,json,html} into DIR")
    address_option(run)
    run.set_defaults(run=_run)

    ensemble = commands.add_parser("ensemble", help="stacked ensembles of a sweep's best trials, and the leaderboard")
    ensemble.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a sweep run directory")
    ensemble.add_argument("--experiment", help="take the trials of this MLflow experiment instead (with --tracking-uri, --out)")
    ensemble.add_argument("--tracking-uri", help="MLflow server (default: the sweep's, or its own store served)")
    ensemble.add_argument("--out", help="output folder (default RUN_DIR/ensembles)")
    ensemble.add_argument("--top-k", dest="top_k", type=int, help="best trials per model and dataset (default 5)")
    ensemble.add_argument("--learners", help="comma-separated meta-learners (default: all that suit the task)")
    ensemble.add_argument("--protocol", choices=["crossfit", "oof"])
    ensemble.add_argument("--folds", type=int, help="grouped folds (default 5)")
    ensemble.add_argument("--seeds", type=int, help="runs averaged in the seed ensemble (default 3)")
    ensemble.add_argument("--caruana-steps", dest="caruana_steps", type=int)
    ensemble.add_argument("--bootstrap", type=int, help="resamples per interval (default 1000)")
    ensemble.add_argument("--seed", type=int)
    ensemble.add_argument("--no-register", action="store_true", help="do not register the best ensemble")
    ensemble.set_defaults(run=_ensemble)

    leaderboard = commands.add_parser("leaderboard", help="export a built leaderboard as csv, md, json or html")
    leaderboard.add_argument("path", metavar="RUN_DIR", help="a sweep run directory (or an ensembles folder)")
    leaderboard.add_argument("--format", choices=["csv", "md", "json", "html"], default="md")
    leaderboard.add_argument("--out", help="file to write (default: standard output)")
    leaderboard.set_defaults(run=_leaderboard)

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
