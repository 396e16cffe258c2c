"""MLflow tracking of a sweep: one run per sweep, one per (model, dataset) study, one per trial.

The runs nest (``mlflow.parentRunId``): sweep -> study -> trial, all in one experiment named
after the run directory. Who logs what:

* the driver (`SweepTracking`) opens the sweep and study runs, and at the end of each study logs
  its optimisation-history and parameter-importance plots and registers the best trial
  (`msa.platform.model_registry`);
* each trial process opens (or, when retried or resumed, finds again by its Ray trial id) its
  own run, logs params once and, from rank 0, every epoch's metrics over HTTP;
* the driver's `TrialRunCloser` callback, when a trial ends however it ends (finished, stopped
  by ASHA, failed), logs the test metrics of the trial's selected checkpoint, the checkpoint,
  its config and predictions, and the learning curves, then closes the run.

Runs are found again by tags, never by ids kept elsewhere, so `--resume` (same store) continues
the same runs and never re-logs a param.
"""
from __future__ import annotations

import functools
import getpass
import json
import math
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ray import tune

from msa.platform.config import to_plain
from msa.platform.mlflow_server import client

ROLE_TAG = "msa.role"  # sweep | study | trial
PAIR_TAG = "msa.pair"
TRIAL_TAG = "ray_trial_id"
STATE_TAG = "msa.trial_state"  # complete | pruned | failed
RUN_DIR_TAG = "msa.run_dir"
FAIL_REASON_TAG = "msa.fail_reason"  # a failed trial's error, as Ray recorded it (Optuna: user attr fail_reason)
PACKAGES = ("msa-sweep", "torch", "ray", "deepspeed", "optuna", "mlflow")


@functools.cache
def environment_tags() -> dict[str, str]:
    """Where and with what a run executes: git commit of this code, package versions, host.
    The same for the life of a process (a reused trial process asks once)."""
    tags = {"git_commit": _git_commit(), "host": socket.gethostname(), "user": getpass.getuser(),
            "version.python": sys.version.split()[0]}
    for package in PACKAGES:
        try:
            tags[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            tags[f"version.{package}"] = "not installed"
    return tags


def _git_commit() -> str:
    source = Path(__file__).resolve().parent
    try:
        done = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if done.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return done.stdout.strip() + ("-dirty" if dirty else "")


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``: nested configs as MLflow params."""
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return flat


def find_runs(mlflow_client, experiment_id: str, match: dict[str, str], *, max_results: int = 1000) -> list:
    """Runs of `experiment_id` whose tags include every key and value of `match`."""
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in match.items())
    return mlflow_client.search_runs([experiment_id], filter_string=query, max_results=max_results)


def find_or_create_run(mlflow_client, experiment_id: str, match: dict[str, str], *, name: str,
                       tags: dict[str, str], parent_run_id: str | None = None) -> tuple[str, bool]:
    """The run of `experiment_id` whose tags include `match`, created (with `tags`) if none.

    Returns the run id and whether it was created now. A run found again is set RUNNING."""
    found = find_runs(mlflow_client, experiment_id, match, max_results=1)
    if found:
        run_id = found[0].info.run_id
        mlflow_client.update_run(run_id, status="RUNNING")
        return run_id, False
    all_tags = {**tags, **match, "mlflow.runName": name}
    if parent_run_id is not None:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow_client.create_run(experiment_id, tags=all_tags, run_name=name)
    return run.info.run_id, True


def log_params(mlflow_client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow's per-request limit
        mlflow_client.log_batch(run_id, params=items[start : start + 100])


def log_metrics(mlflow_client, run_id: str, values: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None]
    for start in range(0, len(items), 1000):
        mlflow_client.log_batch(run_id, metrics=items[start : start + 1000])


@dataclass(frozen=True)
class TrialTracking:
    """What a trial needs to log (picklable: shipped to trials with the pair's context)."""

    uri: str
    experiment_id: str
    study_run_id: str
    pair: str
    tags: dict[str, str]  # sweep, model and dataset tags every trial run carries
    dataset_name: str
    dataset_source: str
    dataset_fingerprint: str


def trial_params(train_config: dict[str, Any]) -> dict[str, str]:
    """The trial's fully resolved config, flattened: TrainConfig fields and every model-config
    field with its default filled in."""
    from msa.models.registry import get_entry
    from msa.platform.config import build_dataclass
    from msa.platform.train import resolve_config

    resolved = to_plain(resolve_config(train_config, where="trial config"))
    model_config = build_dataclass(get_entry(resolved["model"]).config_class, resolved["model_config"],
                                   where="model_config")
    return flatten({**resolved, "model_config": to_plain(model_config)})


def open_trial_run(tracking: TrialTracking, trial_id: str, train_config: dict[str, Any]) -> str:
    """The trial's run: created with params, tags and dataset inputs on its first attempt, found
    again (by Ray trial id) on a retry or a resumed sweep, where nothing is re-logged."""
    mlflow_client = client(tracking.uri)
    tags = {**tracking.tags, **environment_tags(), "seed": str(train_config.get("seed", "")), ROLE_TAG: "trial"}
    run_id, created = find_or_create_run(
        mlflow_client, tracking.experiment_id, {TRIAL_TAG: trial_id, PAIR_TAG: tracking.pair},
        name=trial_id, tags=tags, parent_run_id=tracking.study_run_id,
    )
    if created:
        log_params(mlflow_client, run_id, trial_params(train_config))
        _log_dataset_inputs(mlflow_client, run_id, tracking)
    return run_id


def _log_dataset_inputs(mlflow_client, run_id: str, tracking: TrialTracking) -> None:
    """The dataset file (name, SHA-256 digest, path) as the run's input."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.exceptions import MlflowException

    with warnings.catch_warnings():  # a local path matches two registered source types; both are the same
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(tracking.dataset_source)
    dataset = MetaDataset(source, name=tracking.dataset_name, digest=tracking.dataset_fingerprint[:36])._to_mlflow_entity()
    # One input: MLflow keeps a dataset once per run, whatever context tags differ.
    inputs = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "train/valid/test")])]
    for attempt in range(3):
        try:
            mlflow_client.log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as error:
            # Concurrent trials logging the same new dataset: the store checks, then inserts, so
            # all but one hit its unique key; the dataset exists now, and a retry links it.
            if "unique constraint" not in str(error).lower() or attempt == 2:
                raise


class EpochLogger:
    """Logs one epoch record (train loss terms, valid metrics, best so far, seconds) at step=epoch.

    An attempt that resumes from an earlier epoch's checkpoint (a retry, a resumed sweep) re-runs
    the epochs its predecessor logged but never checkpointed; those are not logged twice (the
    first attempt's values stay: one point per epoch; on CPU the re-run gives the same values)."""

    SKIP = ("epoch", "improved", "final")

    def __init__(self, uri: str, run_id: str):
        self.client, self.run_id = client(uri), run_id
        self.logged_through = max((m.step for m in self.client.get_metric_history(run_id, "train_loss")), default=0)

    def __call__(self, record: dict[str, float]) -> None:
        if record["epoch"] <= self.logged_through:
            return
        values = {k: v for k, v in record.items() if k not in self.SKIP}
        log_metrics(self.client, self.run_id, values, step=int(record["epoch"]))


def log_trial_outcome(mlflow_client, run_id: str, folder: Path, state: str) -> None:
    """After a trial ends: its selected checkpoint's test (and valid) metrics, the checkpoint
    files and the learning curves; then the run is closed (FAILED for a failed trial)."""
    from msa.platform.plots import learning_curves

    metrics_file = folder / "metrics.json"
    if metrics_file.is_file():
        stored = json.loads(metrics_file.read_text())
        selected = {f"test_{k}": v for k, v in stored["test"].items()}
        selected.update({f"selected_valid_{k}": v for k, v in stored["valid"].items()})
        selected["best_epoch"] = stored["best_epoch"]
        # Everything below is idempotent but these points: a close cut short (a killed driver) is redone.
        if "best_epoch" not in mlflow_client.get_run(run_id).data.metrics:
            log_metrics(mlflow_client, run_id, {k: (math.nan if v is None else v) for k, v in selected.items()})
        mlflow_client.set_tag(run_id, "weights_sha256", stored["weights_sha256"])
        for name in ("config.yaml", "predictions_valid.csv", "predictions_test.csv"):
            mlflow_client.log_artifact(run_id, str(folder / name))
        mlflow_client.log_artifacts(run_id, str(folder), artifact_path="checkpoint")
        with tempfile.TemporaryDirectory() as scratch:
            plot = learning_curves(_epoch_curves(mlflow_client, run_id), stored["selection_metric"],
                                   Path(scratch) / "learning_curves.png")
            mlflow_client.log_artifact(run_id, str(plot), artifact_path="plots")
    mlflow_client.set_tag(run_id, STATE_TAG, state)  # last: the mark of a complete close
    mlflow_client.set_terminated(run_id, status="FAILED" if state == "failed" else "FINISHED")


def _epoch_curves(mlflow_client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every per-epoch metric the run logged (a stopped trial's too) as (epoch, value) points."""
    return {name: sorted((m.step, m.value) for m in mlflow_client.get_metric_history(run_id, name))
            for name in mlflow_client.get_run(run_id).data.metrics if name.startswith(("train_", "valid_", "best_valid_"))}


def failure_reason(error_file: str | Path | None) -> str:
    """What made a trial fail: the last line of the latest failure in Ray's ``error.txt``
    (e.g. ``...NonFiniteLossError: training loss became nan in epoch 1; ...``)."""
    try:
        lines = [line.strip() for line in Path(error_file).read_text(errors="replace").splitlines() if line.strip()]
    except (OSError, TypeError):
        return "unknown (Ray recorded no error file)"
    return lines[-1][:500] if lines else "unknown (empty error file)"


class TrialRunCloser(tune.Callback):
    """Driver-side: when Tune ends a trial, log its outcome to the trial's run (see module doc)."""

    def __init__(self, tracking: TrialTracking, trials_dir: Path):
        self.tracking, self.trials_dir = tracking, Path(trials_dir)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._close(trial, "complete" if (trial.last_result or {}).get("final") else "pruned")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._close(trial, "failed")

    def _close(self, trial, state: str) -> None:
        mlflow_client = client(self.tracking.uri)
        config = {**trial.config, "out": str(self.trials_dir / trial.trial_id)}
        run_id = open_trial_run(self.tracking, trial.trial_id, config)  # a trial that failed before opening it
        closed_as = mlflow_client.get_run(run_id).data.tags.get(STATE_TAG)
        if closed_as is not None:  # closed before a driver was killed; Tune ran it again from its last checkpoint
            mlflow_client.set_terminated(run_id, status="FAILED" if closed_as == "failed" else "FINISHED")
            return
        if state == "failed":
            mlflow_client.set_tag(run_id, FAIL_REASON_TAG, failure_reason(trial.error_file))
        log_trial_outcome(mlflow_client, run_id, self.trials_dir / trial.trial_id, state)


class SweepTracking:
    """Driver side of a sweep's tracking: the server (its own, or the configured URI, checked
    first), the experiment, the sweep run and one run per study. Use as a context manager; the
    sweep run ends FINISHED, KILLED (Ctrl-C) or FAILED, and an own server is stopped."""

    def __init__(self, uri: str, run_dir: Path, sweep_config: dict[str, Any]):
        """Use `uri` (the caller has checked it answers, before writing anything), or launch the
        sweep's own server now (it boots while Ray starts)."""
        from msa.platform.mlflow_server import MlflowServer

        self.run_dir, self.sweep_config = Path(run_dir), sweep_config
        self.server = None
        if uri:
            self.uri = uri
        else:
            self.server = MlflowServer(self.run_dir).launch()
            self.uri = self.server.uri

    def __enter__(self) -> "SweepTracking":
        name = self.run_dir.name
        try:
            if self.server is not None:
                self.server.wait_ready()
            self.client = client(self.uri)
            experiment = self.client.get_experiment_by_name(name)
            self.experiment_id = (experiment.experiment_id if experiment is not None
                                  else self.client.create_experiment(name, tags={RUN_DIR_TAG: str(self.run_dir)}))
            self.tags = {**environment_tags(), RUN_DIR_TAG: str(self.run_dir), "msa.sweep": name}
            self.sweep_run_id, created = find_or_create_run(
                self.client, self.experiment_id, {ROLE_TAG: "sweep"}, name=name, tags=self.tags)
            if created:
                log_params(self.client, self.sweep_run_id, flatten(self.sweep_config))
        except BaseException:
            self.stop_server()
            raise
        print(f"MLflow: experiment {name!r} at {self.uri}", flush=True)
        return self

    def __exit__(self, kind, error, trace) -> None:
        """End the sweep run, and a study run left open by an interruption or error, alike."""
        try:
            status = "FINISHED" if kind is None else "KILLED" if issubclass(kind, KeyboardInterrupt) or \
                getattr(error, "exit_code", None) == 130 else "FAILED"
            for study in find_runs(self.client, self.experiment_id, {ROLE_TAG: "study"}):
                if study.info.status == "RUNNING":
                    self.client.set_terminated(study.info.run_id, status=status)
            self.client.set_terminated(self.sweep_run_id, status=status)
        finally:
            self.stop_server()

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()

    def open_study(self, pair: str, model: str, dataset) -> TrialTracking:
        """The study's run (created, or found again on resume) and what its trials need."""
        source = Path(dataset.source)
        fingerprint = dataset.fingerprint
        study_tags = {RUN_DIR_TAG: str(self.run_dir), "msa.sweep": self.run_dir.name, "msa.sweep_run_id": self.sweep_run_id,
                      "model": model, "dataset": dataset.name, "dataset_fingerprint": fingerprint,
                      "metric_suite": dataset.metric_suite}
        run_id, _ = find_or_create_run(self.client, self.experiment_id, {ROLE_TAG: "study", PAIR_TAG: pair},
                                       name=pair, tags={**self.tags, **study_tags}, parent_run_id=self.sweep_run_id)
        return TrialTracking(uri=self.uri, experiment_id=self.experiment_id, study_run_id=run_id, pair=pair,
                             tags=study_tags, dataset_name=dataset.name, dataset_source=str(source.resolve()),
                             dataset_fingerprint=fingerprint)

    def _close_left_open(self, pair: str, study, trials_dir: Path) -> None:
        """Close the trial runs a killed driver left RUNNING: a trial that finished unknown to the
        restored Tune run is closed with its outcome; one the study handed to a new Ray trial,
        KILLED."""
        from optuna.trial import TrialState

        outcome = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
        states = {t.user_attrs.get(TRIAL_TAG): outcome.get(t.state) for t in study.get_trials(deepcopy=False)}
        for run in find_runs(self.client, self.experiment_id, {PAIR_TAG: pair, ROLE_TAG: "trial"}):
            if run.info.status != "RUNNING":
                continue
            state = run.data.tags.get(STATE_TAG) or states.get(run.data.tags[TRIAL_TAG])
            if state is None:
                self.client.set_terminated(run.info.run_id, status="KILLED")
            else:
                log_trial_outcome(self.client, run.info.run_id, trials_dir / run.data.tags[TRIAL_TAG], state)

    def close_study(self, tracking: TrialTracking, study, row: dict[str, Any]) -> None:
        """Log the study's outcome and plots, register its best trial, and close its run."""
        from msa.platform.model_registry import register_checkpoint, registered_name
        from msa.platform.plots import optimization_history, param_importances

        run_id = tracking.study_run_id
        self._close_left_open(tracking.pair, study, Path(row["run_dir"]) / "trials" / tracking.pair)
        log_metrics(self.client, run_id, {"trials_complete": row["complete"], "trials_pruned": row["pruned"],
                                          "trials_failed": row["failed"],
                                          **({f"best_{row['metric']}": row["best_value"]} if row["best_value"] is not None else {})})
        with tempfile.TemporaryDirectory() as scratch:
            if row["complete"] + row["pruned"] > 0:
                self.client.log_artifact(run_id, str(optimization_history(study, Path(scratch) / "optimization_history.png")), "plots")
            try:
                self.client.log_artifact(run_id, str(param_importances(study, Path(scratch) / "param_importances.png")), "plots")
                self.client.set_tag(run_id, "param_importances", "plots/param_importances.png")
            except (ValueError, RuntimeError) as exc:  # fANOVA needs >= 2 complete trials with varied params
                self.client.set_tag(run_id, "param_importances", f"not computed: {exc}")
        if row["best_checkpoint"] is not None:
            folder = Path(row["best_checkpoint"])
            best_trial = folder.name
            (trial_run,) = find_runs(self.client, self.experiment_id, {TRIAL_TAG: best_trial, PAIR_TAG: tracking.pair})
            stored = json.loads((folder / "metrics.json").read_text())
            name = registered_name(tracking.tags["model"], tracking.tags["dataset"])
            version_tags = {
                "msa.run_id": trial_run.info.run_id, "msa.study_run_id": run_id, "msa.sweep_run_id": self.sweep_run_id,
                "msa.sweep": self.run_dir.name, RUN_DIR_TAG: str(self.run_dir), "msa.experiment_id": self.experiment_id,
                TRIAL_TAG: best_trial, "selection_metric": stored["selection_metric"],
                "dataset_fingerprint": tracking.dataset_fingerprint, "weights_sha256": stored["weights_sha256"],
                **{f"valid_{k}": str(v) for k, v in stored["valid"].items()},
                **{f"test_{k}": str(v) for k, v in stored["test"].items()},
            }
            version = register_checkpoint(self.uri, trial_run.info.run_id, folder, name, version_tags)
            self.client.set_tag(run_id, "registered_model", f"{name}/{version}")
            print(f"[{tracking.pair}] registered {name} version {version} (alias champion) from trial {best_trial}", flush=True)
        self.client.set_terminated(run_id, status="FINISHED")
