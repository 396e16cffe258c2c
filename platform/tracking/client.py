"""MLflow as msa uses it: the client, the tags that find runs again, batched logging.

Runs are found by tags, never by ids kept elsewhere, so a retried trial, a resumed sweep and a
killed driver's successor all continue the same runs. Used from the driver, Tune trial actors
and Ray Train workers alike.
"""
from __future__ import annotations

import functools
import getpass
import json
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

ROLE_TAG = "msa.role"  # sweep | study | trial | ensembles | ensemble
PAIR_TAG = "msa.pair"
TRIAL_TAG = "ray_trial_id"
STATE_TAG = "msa.trial_state"  # complete | pruned | failed
RUN_DIR_TAG = "msa.run_dir"
FAIL_REASON_TAG = "msa.fail_reason"  # a failed trial's error, as Ray recorded it (Optuna: user attr fail_reason)
PACKAGES = ("msa-sweep", "torch", "ray", "deepspeed", "optuna", "mlflow")


def client(uri: str) -> MlflowClient:
    """An `MlflowClient` for tracking and registry at `uri`."""
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


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
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``: nested configs as MLflow params.

    Example:
        >>> flatten({"lr": 0.001, "model_config": {"hidden": 32}, "learners": ["mean"]})
        {'lr': '0.001', 'model_config.hidden': '32', 'learners': '["mean"]'}
    """
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


def experiment_id(mlflow_client, name: str, tags: dict[str, str] | None = None) -> str:
    """The id of experiment `name`, created (with `tags`) if it does not exist yet."""
    found = mlflow_client.get_experiment_by_name(name)
    return found.experiment_id if found is not None else mlflow_client.create_experiment(name, tags=tags)


def log_params(mlflow_client, run_id: str, params: dict[str, str]) -> None:
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow's per-request limit
        mlflow_client.log_batch(run_id, params=items[start : start + 100])


def log_metrics(mlflow_client, run_id: str, values: dict[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None]
    for start in range(0, len(items), 1000):
        mlflow_client.log_batch(run_id, metrics=items[start : start + 1000])
