"""A trial's MLflow run: opened (or found again) by the trial, logged every epoch, closed with
its outcome.

The runs of a sweep nest (``mlflow.parentRunId``): sweep -> study -> trial, in one experiment
named after the run directory (the driver's side is `sweep_runs.py`). What runs where:

* in the Tune trial actor: `open_trial_run` creates the trial's run on its first attempt (params,
  tags, the dataset input) or finds it again by Ray trial id on a retry or a resumed sweep;
* on rank 0 of the training (the trial actor, or Ray Train's first worker): `EpochLogger` logs
  every epoch over HTTP;
* in the driver, when Tune ends the trial however it ended: `log_trial_outcome` logs the
  selected checkpoint's metrics, files and learning curves, then closes the run.
"""
from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.exceptions import MlflowException

from msa.models.registry import build_model_config
from msa.platform.core.config import to_plain
from msa.platform.tracking.client import (
    PAIR_TAG,
    ROLE_TAG,
    STATE_TAG,
    TRIAL_TAG,
    client,
    environment_tags,
    find_or_create_run,
    flatten,
    log_metrics,
    log_params,
)
from msa.platform.tracking.plots import learning_curves
from msa.platform.training.checkpoint import SeedGroup
from msa.platform.training.config import TrainConfig


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


def trial_params(train_config: TrainConfig) -> dict[str, str]:
    """The trial's fully resolved config, flattened: TrainConfig fields and every model-config
    field with its default filled in."""
    resolved = to_plain(train_config)
    model_config = build_model_config(resolved["model"], resolved["model_config"], where="model_config")
    return flatten({**resolved, "model_config": to_plain(model_config)})


def open_trial_run(tracking: TrialTracking, trial_id: str, train_config: TrainConfig) -> str:
    """The trial's run: created with params, tags and dataset inputs on its first attempt, found
    again (by Ray trial id) on a retry or a resumed sweep, where nothing is re-logged."""
    mlflow_client = client(tracking.uri)
    seed, count = train_config.seed, train_config.seeds
    tags = {**tracking.tags, **environment_tags(), "seed": str(seed), ROLE_TAG: "trial",
            "seeds": ",".join(str(seed + offset) for offset in range(count))}
    run_id, created = find_or_create_run(
        mlflow_client, tracking.experiment_id, {TRIAL_TAG: trial_id, PAIR_TAG: tracking.pair},
        name=trial_id, tags=tags, parent_run_id=tracking.study_run_id,
    )
    if created:
        log_params(mlflow_client, run_id, trial_params(train_config))
        _log_dataset_input(mlflow_client, run_id, tracking)
    return run_id


def _log_dataset_input(mlflow_client, run_id: str, tracking: TrialTracking) -> None:
    """The dataset file (name, SHA-256 digest, local path) as the run's input."""
    dataset = Dataset(name=tracking.dataset_name, digest=tracking.dataset_fingerprint[:36], source_type="local",
                      source=json.dumps({"uri": tracking.dataset_source}))
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
    files and the learning curves; then the run is closed (FAILED for a failed trial). For a
    seed group the metrics are seed means, with their spread (``_sd``) and each seed's own
    (``seed<k>_test_<metric>``) beside them."""
    group = SeedGroup(folder)
    if group.exists():
        checkpoints = group.checkpoints
        selected = {f"test_{k}": v for k, v in group.mean("test").items()}
        selected.update({f"selected_valid_{k}": v for k, v in group.mean("valid").items()})
        selected["best_epoch"] = sum(c.metrics["best_epoch"] for c in checkpoints) / len(checkpoints)
        if len(checkpoints) > 1:
            selected.update({f"test_{k}_sd": v for k, v in group.sd("test").items()})
            selected.update({f"selected_valid_{k}_sd": v for k, v in group.sd("valid").items()})
            for seed, scores in zip(group.seeds, group.scores("test")):
                selected.update({f"seed{seed}_test_{k}": v for k, v in scores.items()})
        # Everything below is idempotent but these points: a close cut short (a killed driver) is redone.
        if "best_epoch" not in mlflow_client.get_run(run_id).data.metrics:
            log_metrics(mlflow_client, run_id, {k: (math.nan if v is None else v) for k, v in selected.items()})
        mlflow_client.set_tag(run_id, "weights_sha256", ",".join(c.metrics["weights_sha256"] for c in checkpoints))
        for checkpoint in checkpoints:
            within = None if checkpoint.folder == group.folder else checkpoint.folder.name
            for path in checkpoint.files():
                mlflow_client.log_artifact(run_id, str(path), artifact_path=within)
        mlflow_client.log_artifacts(run_id, str(folder), artifact_path="checkpoint")
        with tempfile.TemporaryDirectory() as scratch:
            plot = learning_curves(_epoch_curves(mlflow_client, run_id), group.selection_metric,
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
