"""The MLflow model registry side: checkpoints as pyfunc models, registration, listing, loading.

A registered model ``msa-<model>-<dataset>`` is an MLflow pyfunc whose artifacts are one
checkpoint folder (weights + resolved config), or a seed group's folders, one per seed, whose
mean it predicts. Its signature is tensor based: per modality a
float32 ``(-1, T, d)`` array named after the modality and an int64 ``(-1,)`` array named
``<modality>_lengths``; the output is ``(-1,)`` scores (regression) or ``(-1, C)`` class
probabilities. A model with a text encoder takes ``raw_text`` instead of the text features and
lengths: a ``(-1,)`` string array, one transcript per clip, tokenized by the tokenizer files its
checkpoint keeps (and, when it trained on a frozen-prefix cache, its prefix computed as the
cache was). `predict` runs the training loop's own `predict` (same batch size, fp32 on CPU,
and the torch thread count the checkpoint recorded, since float sums follow it), so it
reproduces the checkpoint's stored valid/test predictions bit for bit. MLflow enforces the
signature on every call; `predict_splits` checks a dataset first, for a one-line error.
Loading needs this package installed (the model class is referenced, not copied); models
registered by msa-sweep 0.1.0 name the class by its old path, `msa.platform.model_registry`,
which still re-exports it.

Runs in the driver (registration), and in whichever process loads a registered model.
"""
from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

from msa.models.registry import build_model
from msa.platform.core.compat import untyped_python_model
from msa.platform.core.config import build_dataclass
from msa.platform.core.errors import MsaError
from msa.platform.core.spec import DataSpec
from msa.platform.data.text import encode_texts, load_tokenizer
from msa.platform.tracking.client import client
from msa.platform.training.checkpoint import Checkpoint, SeedGroup
from msa.platform.training.config import TextEncoderConfig
from msa.platform.training.predict import predict
from msa.platform.training.text_encoder import TextEncoderModel, frozen_layers, load_encoder, prefix_states

CHAMPION = "champion"
LENGTHS_SUFFIX = "_lengths"
RAW_TEXT = "raw_text"


def registered_name(model: str, dataset: str) -> str:
    return f"msa-{model}-{dataset}"


class CheckpointModel(untyped_python_model()):
    """A trained checkpoint folder, or a seed group's, as a pyfunc:
    ``predict({modality: (N,T,d), modality_lengths: (N,)})``; a seed group predicts its seeds'
    mean. Its signature (not type hints) describes the input, which MLflow enforces before
    `predict`."""

    def load_context(self, context) -> None:
        # One artifact "checkpoint", or one "checkpoint_seed<k>" per seed of a group.
        self.checkpoints = [LoadedCheckpoint(Path(path)) for key, path in context.artifacts.items()
                            if key == "checkpoint" or key.startswith("checkpoint_seed")]

    def predict(self, context, model_input, params=None):
        # MLflow has enforced the signature (names, dtypes, shapes) before this is called.
        return mean_prediction(self.checkpoints, model_input)


def mean_prediction(checkpoints: list["LoadedCheckpoint"], inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The checkpoints' mean prediction (a seed group's, or an ensemble member's K fold models');
    one checkpoint's own, unchanged."""
    if len(checkpoints) == 1:
        return checkpoints[0].predict(inputs)
    return np.mean([checkpoint.predict(inputs) for checkpoint in checkpoints], axis=0)


class LoadedCheckpoint:
    """A checkpoint folder's model in eval mode, predicting like the training loop did."""

    def __init__(self, folder: Path):
        checkpoint = Checkpoint(folder)
        weights = checkpoint.verified_weights("checkpoint")
        self.config, self.spec = checkpoint.config, checkpoint.spec
        self.threads = checkpoint.metrics.get("torch_threads")  # absent in checkpoints of msa-sweep 0.1.0
        self.model = build_model(self.config["model"], self.spec, self.config["model_config"])
        self.text_encoding = checkpoint.text_encoding
        if self.text_encoding is not None:
            encoder_folder = checkpoint.verified_text_encoder("checkpoint")
            encoder = load_encoder(encoder_folder, pretrained=False)
            encoder_config = build_dataclass(TextEncoderConfig, self.config["text_encoder"], where=f"{folder} text_encoder")
            self.model = TextEncoderModel(encoder, self.model, frozen_layers(encoder_config, encoder.config.num_hidden_layers))
            self.tokenizer = load_tokenizer(encoder_folder)
        self.model.load_state_dict(torch.load(weights, weights_only=True))
        self.model.eval()

    @property
    def feature_modalities(self) -> tuple[str, ...]:
        """The modalities given as features (all but text when the model reads raw text)."""
        return tuple(m for m in self.spec.modalities if not (self.text_encoding and m == "text"))

    def inputs_of(self, split) -> dict[str, np.ndarray]:
        """A dataset split as this model's pyfunc input."""
        return split_inputs(split, self.feature_modalities, raw_text=self.text_encoding is not None)

    def predict(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """``{modality: (N, T, d), modality_lengths: (N,)[, raw_text: (N,)]}`` -> ``(N,)`` scores
        or ``(N, C)`` probabilities."""
        modalities = self.feature_modalities
        features = {m: torch.as_tensor(np.asarray(inputs[m], dtype=np.float32)) for m in modalities}
        lengths = {m: torch.as_tensor(np.asarray(inputs[m + LENGTHS_SUFFIX], dtype=np.int64)) for m in modalities}
        # The training loop's own predict with its batch size and thread count: the stored
        # predictions, exactly.
        with torch_threads(self.threads):
            if self.text_encoding is not None:
                ids, counts = encode_texts(self.tokenizer, np.asarray(inputs[RAW_TEXT]), self.text_encoding["max_length"])
                cached = self.text_encoding["prefix_layers"]  # trained on the prefix cache: computed as it was
                text = prefix_states(self.model, ids, counts, [cached])[cached] if cached else ids
                features = {"text": torch.as_tensor(text), **features}
                lengths = {"text": torch.as_tensor(counts), **lengths}
            return predict(self.model, features, lengths, self.spec.task, int(self.config["batch_size"]))


@contextlib.contextmanager
def torch_threads(count: int | None):
    """torch's intra-op threads set to `count` inside the block (unchanged for None), then restored."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def split_inputs(split, modalities, *, raw_text: bool = False) -> dict[str, np.ndarray]:
    """A dataset split as the pyfunc input mapping (float32 features, int64 lengths, and the
    transcripts as strings when `raw_text`)."""
    inputs = {m: np.asarray(split.features[m], dtype=np.float32) for m in modalities}
    inputs.update({m + LENGTHS_SUFFIX: np.asarray(split.lengths[m], dtype=np.int64) for m in modalities})
    if raw_text:
        inputs[RAW_TEXT] = np.asarray(split.raw_text, dtype=str)
    return inputs


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


def register_checkpoint(uri: str, run_id: str, folder: Path, name: str, tags: dict[str, str]) -> str:
    """Log `folder` (a checkpoint, or a seed group: every seed's) as a pyfunc model of run
    `run_id`, register it as `name`, move `champion` to it.

    A run already registered under `name` (a resumed sweep) is not registered twice. Returns the version.

    Raises:
        MsaError: the weights do not match the SHA-256 the trial recorded (nothing is registered)."""
    group = SeedGroup(folder)
    for checkpoint in group.checkpoints:
        checkpoint.verified_weights(f"registering {name}")
    if len(group.checkpoints) == 1:
        artifacts = {"checkpoint": str(folder)}
    else:
        artifacts = {f"checkpoint_seed{seed}": str(c.folder) for seed, c in zip(group.seeds, group.checkpoints)}
    return register_pyfunc(uri, run_id, name, tags, python_model=CheckpointModel(), artifacts=artifacts,
                           signature=checkpoint_signature(group.first))


def checkpoint_signature(checkpoint: Checkpoint) -> ModelSignature:
    return signature_for(checkpoint.spec, raw_text=checkpoint.text_encoding is not None)


def register_pyfunc(uri: str, run_id: str, name: str, tags: dict[str, str], *, python_model, artifacts: dict[str, str],
                    signature: ModelSignature) -> str:
    """Log `python_model` (with `artifacts` and `signature`) as run `run_id`'s
    model, register it as `name` unless that run already is, tag the version and point
    `champion` at it. Returns the version."""
    mlflow_client = client(uri)
    existing = mlflow_client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        version = max(existing, key=lambda v: int(v.version)).version
    else:
        with _quiet(), _using(uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=python_model, artifacts=artifacts,
                signature=signature, registered_model_name=name, await_registration_for=60,
                pip_requirements=_requirements(),
            )
        version = str(info.registered_model_version)
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, version, key, value)
    mlflow_client.set_registered_model_alias(name, CHAMPION, version)
    return version


@contextlib.contextmanager
def _using(uri: str):
    """MLflow's fluent API (log_model, load_model) pointed at `uri` for tracking and registry,
    restored afterwards: the fluent URIs are process-wide."""
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


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


def _requirements() -> list[str]:
    packages = ("torch", "numpy", "pyyaml", "mlflow", "transformers")
    return [f"{package}=={metadata.version(package)}" for package in packages] + ["msa-sweep"]


def load_registered(model_uri: str, tracking_uri: str):
    """`mlflow.pyfunc.load_model`, with a one-line error for a name, version or alias that does not exist."""
    try:
        with _using(tracking_uri):
            return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MsaError(f"cannot load {model_uri} from {tracking_uri}: {first}") from None


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
                "valid": {k.removeprefix("valid_"): _tag_number(v) for k, v in tags.items() if k.startswith("valid_")},
                "test": {k.removeprefix("test_"): _tag_number(v) for k, v in tags.items() if k.startswith("test_")},
                "seeds": tags.get("seeds", ""),
                "run_id": version.run_id, "sweep": tags.get("msa.sweep", ""),
                "selection_metric": tags.get("selection_metric", ""),
                "created": time.strftime("%Y-%m-%d %H:%M", time.gmtime(version.creation_timestamp / 1000)),
            })
    return sorted(rows, key=lambda r: (r["name"], -r["version"]))


def _tag_number(text: str) -> float | None:
    """A metric recorded as a version tag (``None`` where it was undefined)."""
    try:
        return float(text)
    except ValueError:
        return None


def predict_splits(model, dataset, splits: list[str], *, what: str) -> dict[str, np.ndarray]:
    """Predictions of a loaded pyfunc `model` for `splits` of `dataset`, after checking that the
    data has the modalities and shapes the model's signature names (`what` names the data)."""
    signature = model.metadata.signature
    if signature is None:
        raise MsaError(f"{what}: the model has no input signature; it was not registered by msa")
    spec = spec_from_signature(signature)
    raw_text = RAW_TEXT in {tensor.name for tensor in signature.inputs.inputs}
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
        out[name] = np.asarray(model.predict(split_inputs(dataset.splits[name], spec.modalities, raw_text=raw_text)))
    return out
