"""The MLflow model registry side: registration, listing, ranking, loading.

A registered model ``msa-<model>-<dataset>`` is an MLflow pyfunc whose artifacts are one
checkpoint folder (weights + resolved config), or a seed group's folders, one per seed, whose
mean it predicts (`pyfunc.py` holds the classes). Its signature is tensor based: per modality a
float32 ``(-1, T, d)`` array named after the modality and an int64 ``(-1,)`` array named
``<modality>_lengths``; the output is ``(-1,)`` scores (regression) or ``(-1, C)`` class
probabilities. A model with a text encoder takes ``raw_text`` instead of the text features and
lengths: a ``(-1,)`` string array, one transcript per clip. MLflow enforces the signature on
every call; `predict_splits` checks a dataset first, for a one-line error.

A model carries its serving code and exact pip requirements (`code_paths.py`), so it loads and
serves where msa-sweep is not installed; a new version gets ``champion`` or ``challenger`` by
the policy in `aliases.py`. Models registered before msa-sweep 0.5.0 carry no code and need the
package installed; those of 0.1.0 name the class by its old path, `msa.platform.model_registry`,
which still re-exports it.

Runs in the driver (registration), and in the process that loads a model through msa (`msa predict`).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

from msa.platform.core.errors import MsaError
from msa.platform.core.metrics import loss_of
from msa.platform.core.spec import DataSpec
from msa.platform.tracking.aliases import REASON_TAG, assign, dataset_of, tag_number
from msa.platform.tracking.client import client
from msa.platform.tracking.code_paths import pinned_requirements, stage_code
from msa.platform.tracking.pyfunc import LENGTHS_SUFFIX, RAW_TEXT, SEED_KEY, CheckpointModel, split_inputs
from msa.platform.training.checkpoint import Checkpoint, SeedGroup

ENV_URIS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
__all__ = ["CheckpointModel"]  # the class's path for models of msa-sweep 0.2.0-0.4.0, which pickled it from here


@dataclass(frozen=True)
class Registered:
    """A registered version and the alias the policy gave it, with the reason."""

    name: str
    version: str
    alias: str
    reason: str


def registered_name(model: str, dataset: str) -> str:
    return f"msa-{model}-{dataset}"


def check_inputs(spec, shapes: dict[str, tuple[int, ...]], *, what: str) -> None:
    """Refuse inputs whose modalities or (T, d) differ from what the model was trained on."""
    missing, extra = sorted(set(spec.modalities) - set(shapes)), sorted(set(shapes) - set(spec.modalities))
    if missing or extra:
        raise MsaError(f"{what} has modalities {sorted(shapes)} but the model takes {list(spec.modalities)}"
                       + (f" (missing {', '.join(missing)})" if missing else "")
                       + (f" (unexpected {', '.join(extra)})" if extra else ""))
    for modality, shape in shapes.items():
        expected = (spec.max_lengths[modality], spec.dims[modality])
        if len(shape) != 3 or tuple(shape[1:]) != expected:
            raise MsaError(f"{what}: modality {modality} has shape (N, T, d) = {tuple(shape)} but the model "
                           f"expects T={expected[0]}, d={expected[1]}")


def signature_for(spec: DataSpec, *, raw_text: bool = False) -> ModelSignature:
    """The tensor signature of a model of `spec` (reading ``raw_text`` instead of text features
    when `raw_text`)."""
    inputs = []
    for modality in spec.modalities:
        if raw_text and modality == "text":
            inputs.append(TensorSpec(np.dtype(str), (-1,), RAW_TEXT))
            continue
        inputs.append(TensorSpec(np.dtype(np.float32), (-1, spec.max_lengths[modality], spec.dims[modality]), modality))
        inputs.append(TensorSpec(np.dtype(np.int64), (-1,), modality + LENGTHS_SUFFIX))
    shape = (-1, spec.num_classes) if spec.task == "classification" else (-1,)
    name = "probabilities" if spec.task == "classification" else "score"
    return ModelSignature(inputs=Schema(inputs), outputs=Schema([TensorSpec(np.dtype(np.float32), shape, name)]))


def spec_from_signature(signature):
    """The `DataSpec` a registered model's input signature describes (task from its output)."""
    inputs = {spec.name: spec.shape for spec in signature.inputs.inputs}
    output = signature.outputs.inputs[0]
    modalities = [name for name in inputs if not name.endswith(LENGTHS_SUFFIX) and name != RAW_TEXT]
    classification = len(output.shape) == 2
    return DataSpec(dims={m: inputs[m][2] for m in modalities}, max_lengths={m: inputs[m][1] for m in modalities},
                    task="classification" if classification else "regression",
                    num_classes=output.shape[1] if classification else 0)


def reads_raw_text(signature: ModelSignature) -> bool:
    """Whether a model of this signature takes transcripts (``raw_text``): it holds a text encoder."""
    return RAW_TEXT in {tensor.name for tensor in signature.inputs.inputs}


def signature_inputs(signature: ModelSignature, split) -> dict[str, np.ndarray]:
    """A dataset split as the input mapping of a model of `signature`: the features it names, and
    the transcripts when it reads raw text."""
    return split_inputs(split, spec_from_signature(signature).modalities, raw_text=reads_raw_text(signature))


def register_checkpoint(uri: str, run_id: str, folder: Path, name: str, tags: dict[str, str]) -> Registered:
    """Log `folder` (a checkpoint, or a seed group: every seed's) as a pyfunc model of run
    `run_id`, register it as `name` and give it its alias (`aliases.assign`).

    A run already registered under `name` (a resumed sweep) is not registered twice.

    Raises:
        MsaError: the weights do not match the SHA-256 the trial recorded (nothing is registered)."""
    group = SeedGroup(folder)
    for checkpoint in group.checkpoints:
        checkpoint.verified_weights(f"registering {name}")
    if len(group.checkpoints) == 1:
        artifacts = {"checkpoint": str(folder)}
    else:
        artifacts = {f"{SEED_KEY}{seed}": str(c.folder) for seed, c in zip(group.seeds, group.checkpoints)}
    return register_pyfunc(uri, run_id, name, tags, python_model=CheckpointModel(), artifacts=artifacts,
                           signature=checkpoint_signature(group.first))


def checkpoint_signature(checkpoint: Checkpoint) -> ModelSignature:
    return signature_for(checkpoint.spec, raw_text=checkpoint.text_encoding is not None)


def register_pyfunc(uri: str, run_id: str, name: str, tags: dict[str, str], *, python_model, artifacts: dict[str, str],
                    signature: ModelSignature) -> Registered:
    """Log `python_model` (with `artifacts`, `signature`, the code of its serving path and its
    pinned requirements) as run `run_id`'s model, register it as `name` unless that run already
    is, tag the version and give it its alias."""
    mlflow_client = client(uri)
    tags = {"dataset": dataset_of(name), **tags}
    existing = mlflow_client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:  # a resumed sweep whose last driver stopped after registering: finish tagging it
        version = max(existing, key=lambda v: int(v.version)).version
        for key, value in tags.items():
            mlflow_client.set_model_version_tag(name, version, key, value)
    else:
        root = type(python_model).__module__
        text_encoder = reads_raw_text(signature)
        with tempfile.TemporaryDirectory() as scratch, _quiet(), _using(uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=python_model, artifacts=artifacts, signature=signature,
                code_paths=[str(stage_code(root, Path(scratch)))],
                pip_requirements=pinned_requirements(root, text_encoder=text_encoder),
            )
            # The version is created with its tags in one request (one per tag took about a
            # second per registration).
            version = mlflow.register_model(info.model_uri, name, await_registration_for=60, tags=tags).version
        version = str(version)
    alias, reason = assign(mlflow_client, name, version)
    return Registered(name=name, version=version, alias=alias, reason=reason)


@contextlib.contextmanager
def _using(uri: str):
    """MLflow's fluent API (log_model, load_model) pointed at `uri` for tracking and registry,
    restored afterwards: the fluent URIs are process-wide, and MLflow also exports them to
    ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI``, which child processes would inherit."""
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    exported = {name: os.environ.get(name) for name in ENV_URIS}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
        for name, value in exported.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _quiet():
    """MLflow's registration chatter (progress lines, run links, advice on type hints and input
    examples, printed to stderr) replaced by the one line the sweep prints itself."""
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def load_registered(model_uri: str, tracking_uri: str):
    """`mlflow.pyfunc.load_model`, with a one-line error for a name, version or alias that does
    not exist. The model runs on this installed package's modules: the code it carries is taken
    off `sys.path` again, so no module msa imports later comes from the model's copy."""
    path = list(sys.path)
    try:
        with _using(tracking_uri):
            return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MsaError(f"cannot load {model_uri} from {tracking_uri}: {first}") from None
    finally:
        sys.path[:] = path


def list_registered(tracking_uri: str) -> list[dict[str, Any]]:
    """One row per version of every ``msa-*`` registered model: aliases, metrics, run and sweep."""
    mlflow_client = client(tracking_uri)
    rows = []
    for model in mlflow_client.search_registered_models(filter_string="name LIKE 'msa-%'"):
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for version in mlflow_client.search_model_versions(f"name = '{model.name}'"):
            tags = version.tags or {}
            rows.append({
                "name": model.name, "version": int(version.version), "aliases": ",".join(aliases.get(str(version.version), [])),
                "valid": {k.removeprefix("valid_"): tag_number(v) for k, v in tags.items() if k.startswith("valid_")},
                "test": {k.removeprefix("test_"): tag_number(v) for k, v in tags.items() if k.startswith("test_")},
                "sd_valid": {k.removeprefix("sd_valid_"): tag_number(v) for k, v in tags.items()
                             if k.startswith("sd_valid_")},
                "seeds": tags.get("seeds", ""),
                "run_id": version.run_id, "sweep": tags.get("msa.sweep", ""),
                "selection_metric": tags.get("selection_metric", ""),
                "dataset": tags.get("dataset") or dataset_of(model.name),
                "fingerprint": tags.get("dataset_fingerprint", ""), "reason": tags.get(REASON_TAG, ""),
                "created": time.strftime("%Y-%m-%d %H:%M", time.gmtime(version.creation_timestamp / 1000)),
                "timestamp": version.creation_timestamp,
            })
    return sorted(rows, key=lambda r: (r["name"], -r["version"]))


def rank_versions(tracking_uri: str, dataset: str) -> list[list[dict[str, Any]]]:
    """Every registered version of `dataset`'s models (every model and ensemble, across sweeps),
    ranked by its valid selection metric: one ranked list per (data fingerprint, metric), since
    only versions of the same data and metric compare; the list holding the newest version first.

    Raises:
        MsaError: no version of `dataset` is registered."""
    rows = list_registered(tracking_uri)
    chosen = [row for row in rows if row["dataset"] == dataset]
    if not chosen:
        known = sorted({row["dataset"] for row in rows})
        raise MsaError(f"no registered model of dataset {dataset!r} at {tracking_uri}"
                       + (f" (datasets: {', '.join(known)})" if known else " (nothing is registered there)"))
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in chosen:
        groups.setdefault((row["fingerprint"], row["selection_metric"]), []).append(row)
    ranked = []
    for (_, metric), members in groups.items():
        members.sort(key=lambda row: (loss_of(metric, row["valid"].get(metric)), -row["timestamp"]))
        ranked.append(members)
    return sorted(ranked, key=lambda members: -max(row["timestamp"] for row in members))


def predict_splits(model, dataset, splits: list[str], *, what: str) -> dict[str, np.ndarray]:
    """Predictions of a loaded pyfunc `model` for `splits` of `dataset`, after checking that the
    data has the modalities and shapes the model's signature names (`what` names the data)."""
    signature = model.metadata.signature
    if signature is None:
        raise MsaError(f"{what}: the model has no input signature; it was not registered by msa")
    spec = spec_from_signature(signature)
    raw_text = reads_raw_text(signature)
    if raw_text and any(split.raw_text is None for split in dataset.splits.values()):
        raise MsaError(f"{what}: the model reads raw text (it has a text encoder) and the data has none")
    given = [m for m in dataset.modalities if not (raw_text and m == "text")]
    check_inputs(spec, {m: dataset.splits["train"].features[m].shape for m in given}, what=what)
    if dataset.task != spec.task:
        raise MsaError(f"{what} is a {dataset.task} dataset but the model predicts {spec.task}")
    if spec.task == "classification" and len(dataset.class_names) != spec.num_classes:
        raise MsaError(f"{what} has {len(dataset.class_names)} classes but the model predicts {spec.num_classes}")
    out = {}
    for name in splits:
        out[name] = np.asarray(model.predict(signature_inputs(signature, dataset.splits[name])))
    return out
