"""The `msa` command line: argparse and dispatch. Each subcommand is one job in `jobs.py`:

* ``msa train``: train one model in-process through DeepSpeed and print its metrics.
* ``msa data synth``: write the deterministic synthetic dataset (MMSA pickle, or .npz).
* ``msa data inspect PATH``: splits, modalities, shapes and label statistics of a dataset.
* ``msa models``: the model registry.
* ``msa mlflow RUN_DIR``: the MLflow UI over a sweep's tracking store, until Ctrl-C.
* ``msa registry``: the msa-* models in the MLflow model registry, with valid/test metrics;
  ``--dataset D`` ranks a dataset's versions across sweeps; ``promote NAME VERSION`` moves champion.
* ``msa predict``: predictions of a registered model (``models:/NAME@champion``) for a dataset.
* ``msa ensemble RUN_DIR``: stacked ensembles of a sweep's best trials and their leaderboard.
* ``msa leaderboard RUN_DIR --format csv|md|json|html|latex``: the leaderboard, exported.
* ``msa run CONFIG``: the whole pipeline (sweep, ensembles, leaderboard).
* ``msa cache list|clear``: the text cache (token ids and frozen prefixes, `msa.platform.data.text_cache`).

``msa sweep`` and ``msa run`` take ``--dry-run``: every input checked, the plan printed, nothing written.

``msa sweep`` and ``msa run`` take ``--address`` to run on a Ray cluster (docs/guides/sweeps.md, "Running on a cluster").

Bad input ends with one line ``msa: error: ...`` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from msa.ensembles.leaderboard import export_board
from msa.platform.core.errors import MsaError
from msa.platform.core.files import human_bytes
from msa.platform.data.text_cache import TextCache, cache_root


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (no usage block) with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise MsaError(f"{self.prog}: {message}")


def _job(name: str):
    """The handler of a subcommand: `jobs.<name>`, imported when the command runs. Deferred
    because `jobs` imports torch, Ray, DeepSpeed's loop and MLflow (seconds), which `msa --help`,
    a usage error and `msa leaderboard` do without."""

    def run(args: argparse.Namespace) -> None:
        from msa.platform import jobs

        getattr(jobs, name)(args)

    return run


def _leaderboard(args: argparse.Namespace) -> None:
    text = export_board(Path(args.path), args.format, Path(args.out) if args.out else None)
    if text is None:
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _cache(args: argparse.Namespace) -> None:
    """`msa cache list|clear`: the text cache's entries and their size, or all of them deleted."""
    cache = TextCache(cache_root(args.dir or ""))
    if args.cache_command == "clear":
        count, nbytes = cache.clear()
        print(f"removed {count} entr{'y' if count == 1 else 'ies'} ({human_bytes(nbytes)}) from {cache.root}")
        return
    entries = cache.entries()
    print(f"{cache.root}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, "
          f"{human_bytes(sum(e.size_bytes for e in entries))}")
    for entry in entries:
        what = "token ids" if entry.depth == 0 else f"prefix after {entry.depth} layer(s)"
        created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(entry.meta["created"]))
        print(f"  {entry.folder.name[:12]}  {entry.meta['dataset']:<16} {what:<26} max_length "
              f"{entry.meta['key']['max_length']:<4} {human_bytes(entry.size_bytes):>10}  {created} UTC")


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand and option of `msa`. It is long because it is the CLI's one declaration:
    one statement per option, read top to bottom; docs/reference/cli.md is generated from it."""
    parser = OneLineParser(prog="msa", description="Sweeps and ensembles for multimodal sentiment analysis.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    train = commands.add_parser("train", help="train one model in-process through DeepSpeed")
    train.add_argument("--config", help="YAML file of train settings (see msa.platform.training.config.TrainConfig)")
    train.add_argument("--model", help="a registered model (msa models lists them)")
    train.add_argument("--data", help="dataset: .npz, MMSA .pkl, or MIntRec folder")
    train.add_argument("--out", help="output folder (must not exist)")
    train.add_argument("--seed", type=int)
    train.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. lr=3e-4 model_config.hidden=128")
    train.set_defaults(run=_job("train"))

    data = commands.add_parser("data", help="create or inspect datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=OneLineParser)
    synth = data_commands.add_parser("synth", help="write the deterministic synthetic dataset")
    synth.add_argument("--task", choices=["regression", "classification"], default="regression")
    synth.add_argument("--out", required=True, help="output .pkl (MMSA schema) or .npz")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--train", type=int, default=600)
    synth.add_argument("--valid", type=int, default=200)
    synth.add_argument("--test", type=int, default=200)
    synth.add_argument("--dims", metavar="M=D,...", help="feature size per modality, e.g. text=768,audio=74,vision=35 "
                                                          "(CMU-MOSEI's; default text=32,audio=12,vision=16)")
    synth.add_argument("--lengths", metavar="M=T,...", help="padded steps per modality, e.g. text=50,audio=50,vision=50 "
                                                            "(default text=20,audio=30,vision=30)")
    synth.add_argument("--words", metavar="MIN-MAX", default="3-7", help="filler words per transcript (default 3-7)")
    synth.set_defaults(run=_job("synth"))
    inspect = data_commands.add_parser("inspect", help="print splits, modalities, shapes and label statistics")
    inspect.add_argument("path")
    inspect.add_argument("--replace-nonfinite", action="store_true", help="read NaN/inf features as 0")
    inspect.set_defaults(run=_job("inspect"))

    def address_option(command: argparse.ArgumentParser) -> None:
        command.add_argument("--address", help="join a running Ray cluster: auto, HOST:PORT or ray://HOST:10001 "
                                                 "(default: $RAY_ADDRESS, else a private runtime on this machine)")
        command.add_argument("-v", "--verbose", action="count", default=0,
                             help="-v: Ray's trial table and the trials' own output too; -vv: every trial result")

    def dry_run_option(command: argparse.ArgumentParser) -> None:
        command.add_argument("--dry-run", action="store_true",
                             help="check every input, print the plan (pairs, budgets, text-cache entries, driver "
                                  "memory) and exit without starting Ray or writing anything")

    sweep = commands.add_parser("sweep", help="run (or resume) a sweep: one Optuna study per model x dataset")
    sweep.add_argument("config", nargs="?", help="sweep YAML (see sweeps/demo.yaml)")
    sweep.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. budget.trials_per_pair=4")
    sweep.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted sweep")
    dry_run_option(sweep)
    address_option(sweep)
    sweep.set_defaults(run=_job("sweep"))

    mlflow = commands.add_parser("mlflow", help="serve the MLflow UI over a sweep run directory's tracking store")
    mlflow.add_argument("run_dir", metavar="RUN_DIR")
    mlflow.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    mlflow.add_argument("--port", type=int, default=5000)
    mlflow.set_defaults(run=_job("mlflow"))

    def tracking_options(command: argparse.ArgumentParser, default=None) -> None:
        # default=SUPPRESS on a subcommand: its unset options leave the parent command's values alone
        where = command.add_mutually_exclusive_group()
        where.add_argument("--tracking-uri", default=default, help="MLflow server (default: $MLFLOW_TRACKING_URI)")
        where.add_argument("--run-dir", default=default,
                           help="a sweep run directory: serve its own MLflow store while this runs")

    registry = commands.add_parser("registry", help="list, rank or promote the msa-* models in the MLflow model registry")
    tracking_options(registry)
    registry.add_argument("--dataset", help="rank every version of this dataset's models across sweeps, on valid")
    registry.set_defaults(run=_job("registry"))
    registry_commands = registry.add_subparsers(dest="registry_command", parser_class=OneLineParser)
    promote = registry_commands.add_parser("promote", help="make NAME VERSION champion by hand (who and why go in its tags)")
    promote.add_argument("name", metavar="NAME", help="e.g. msa-fine-mosi_lite")
    promote.add_argument("version", metavar="VERSION")
    promote.add_argument("--reason", required=True, help="why champion moves (recorded in the version's tags)")
    promote.add_argument("--new-data", action="store_true",
                         help="accept a version trained on other data (fingerprint) than the current champion")
    tracking_options(promote, default=argparse.SUPPRESS)
    promote.set_defaults(run=_job("promote"))

    predict = commands.add_parser("predict", help="predict a dataset with a registered model")
    predict.add_argument("--model", required=True, help="e.g. models:/msa-baseline-mosi_lite@champion")
    predict.add_argument("--data", required=True, help="dataset: .npz, MMSA .pkl, or MIntRec folder")
    predict.add_argument("--out", required=True, help="CSV to write: split,id,label,prediction[,prob_<class>...]")
    predict.add_argument("--split", choices=["train", "valid", "test", "all"], default="test")
    predict.add_argument("--replace-nonfinite", action="store_true", help="read NaN/inf features as 0")
    tracking_options(predict)
    predict.set_defaults(run=_job("predict"))

    run = commands.add_parser("run", help="the whole pipeline: sweep, ensembles, leaderboard")
    run.add_argument("config", help="sweep YAML (its ensemble: section configures the ensembles)")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. ensemble.top_k=3")
    run.add_argument("--export", metavar="DIR", help="also write leaderboard.{csv,md,json,html,tex} into DIR")
    dry_run_option(run)
    address_option(run)
    run.set_defaults(run=_job("run"))

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
    ensemble.set_defaults(run=_job("ensemble"))

    leaderboard = commands.add_parser("leaderboard", help="export a built leaderboard as csv, md, json or html")
    leaderboard.add_argument("path", metavar="RUN_DIR", help="a sweep run directory (or an ensembles folder)")
    leaderboard.add_argument("--format", choices=["csv", "md", "json", "html", "latex"], default="md")
    leaderboard.add_argument("--out", help="file to write (default: standard output)")
    leaderboard.set_defaults(run=_leaderboard)

    cache = commands.add_parser("cache", help="list or clear the text cache (token ids and frozen-prefix hidden states)")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True, parser_class=OneLineParser)
    for name, text in (("list", "list the entries, their size and age"), ("clear", "delete every entry")):
        command = cache_commands.add_parser(name, help=text)
        command.add_argument("--dir", help="the cache folder (default: $MSA_CACHE_DIR, else ~/.cache/msa-sweep/text)")
        command.set_defaults(run=_cache)

    models = commands.add_parser("models", help="list the registered models")
    models.set_defaults(run=_job("models"))
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


def console() -> None:
    """The `msa` command: `main`, and after Ctrl-C an exit that skips the interpreter's
    finalization. A Ctrl-C landing while Ray starts or forks can leave Ray's threads in a state
    that crashes finalization (SIGSEGV instead of status 130, seen in CI); by then `main` has
    stopped everything msa started (the MLflow server, the Ray runtime)."""
    code = main()
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


if __name__ == "__main__":
    console()
