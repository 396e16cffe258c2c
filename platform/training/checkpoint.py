"""The checkpoint folder, the first on-disk contract: its file names, the staged writer, the
one reader, and the SHA-256 check of its weights.

A folder holds one trained model's best epoch (what `msa train --out`, every sweep trial and
every ensemble retraining write):

    model.pt                      the weights (a plain state_dict, read with weights_only=True)
    config.yaml                   the fully resolved train config, model config and data spec
    predictions_valid.csv, predictions_test.csv   id,label,prediction[,prob_<class>...]
    metrics.json                  best epoch, selection metric, valid and test metrics,
                                  dataset fingerprint, weights file and its SHA-256, and the torch
                                  threads the predictions were computed with
    history.csv                   per epoch: train loss terms, valid metrics, seconds
    text_encoder/                 with a text encoder only: its config.json and tokenizer files
                                  (its fine-tuned weights are in model.pt), each file's SHA-256 in
                                  metrics.json, checked on load like the weights

A seed group (``seeds`` > 1) is a folder of such folders, ``seed-<k>/`` per seed, each
recording the group's seeds in its metrics.json (``seed_group``); `SeedGroup` reads a trial's
folder either way.

Rank 0 of a training run writes it (`CheckpointWriter`, in whichever process trains); every
reader (the registry, the tracking of a finished trial, the sweep summary, the ensembles) goes
through `Checkpoint`.
"""
from __future__ import annotations

import csv
import functools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from msa.platform.core.config import to_plain
from msa.platform.core.errors import MsaError
from msa.platform.core.files import atomic_write, finite_or_none, sha256_path
from msa.platform.core.metrics import METRIC_MODES
from msa.platform.core.spec import DataSpec
from msa.platform.data.features import FeatureSet, Split

WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
PREDICTED_SPLITS = ("valid", "test")
TEXT_ENCODER_DIR = "text_encoder"
SEED_FOLDER_PREFIX = "seed-"


def seed_folder(group_folder: Path, seed: int) -> Path:
    """Where a seed group keeps one seed's checkpoint (and, in a trial's state, its resumable state)."""
    return Path(group_folder) / f"{SEED_FOLDER_PREFIX}{seed}"


def predictions_file(split: str) -> str:
    return f"predictions_{split}.csv"


def prediction_table(split: Split, prediction: np.ndarray, class_names: tuple[str, ...]) -> tuple[list[str], list[list]]:
    """Header and rows of a predictions CSV: ``id,label,prediction`` (+ ``prob_<class>`` columns)."""
    if prediction.ndim == 1:
        return ["id", "label", "prediction"], [list(row) for row in zip(split.ids, split.labels.tolist(), prediction.tolist())]
    rows = [[clip, label, int(np.argmax(probs)), *probs]
            for clip, label, probs in zip(split.ids, split.labels.tolist(), prediction.tolist())]
    return ["id", "label", "prediction", *[f"prob_{c}" for c in class_names]], rows


@dataclass(frozen=True)
class Predictions:
    """A predictions file read back: clip ids, labels, and ``(N,)`` scores or ``(N, C)`` probabilities."""

    ids: tuple[str, ...]
    labels: np.ndarray
    values: np.ndarray


class Checkpoint:
    """A checkpoint folder, read: every file of it, parsed once."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def exists(self) -> bool:
        """Whether a complete best epoch was written (metrics.json is written last, in one swap)."""
        return (self.folder / METRICS_FILE).is_file()

    @functools.cached_property
    def metrics(self) -> dict[str, Any]:
        try:
            return json.loads((self.folder / METRICS_FILE).read_text())
        except (OSError, ValueError):
            raise MsaError(f"{self.folder} is not a checkpoint folder (no readable {METRICS_FILE})") from None

    @functools.cached_property
    def config(self) -> dict[str, Any]:
        """The resolved config (train settings, ``model_config``, ``data_spec``)."""
        try:
            return yaml.safe_load((self.folder / CONFIG_FILE).read_text())
        except (OSError, yaml.YAMLError):
            raise MsaError(f"{self.folder} is not a checkpoint folder (no readable {CONFIG_FILE})") from None

    def train_config(self) -> dict[str, Any]:
        """The resolved train config without its data description: what retrains this run."""
        return {k: v for k, v in self.config.items() if k != "data_spec"}

    @property
    def spec(self) -> DataSpec:
        data_spec = self.config["data_spec"]
        return DataSpec(dims=data_spec["dims"], max_lengths=data_spec["max_lengths"], task=data_spec["task"],
                        num_classes=data_spec["num_classes"])

    @property
    def selection_metric(self) -> str:
        return self.metrics["selection_metric"]

    def verified_weights(self, what: str) -> Path:
        """The weights file, after checking it against the SHA-256 metrics.json recorded.

        Raises:
            MsaError: missing weights or metadata, or a digest that differs (modified or corrupted).
        """
        try:
            expected = self.metrics["weights_sha256"]
        except (MsaError, KeyError):
            raise MsaError(f"{what}: {self.folder} has no readable {METRICS_FILE} with the weights' SHA-256") from None
        weights = self.folder / self.metrics.get("weights_file", WEIGHTS_FILE)
        if not weights.is_file():
            raise MsaError(f"{what}: weights {weights} are missing")
        digest = sha256_path(weights)
        if digest != expected:
            raise MsaError(f"{what}: SHA-256 of {weights} is {digest[:16]}... but {METRICS_FILE} recorded "
                           f"{expected[:16]}...; the checkpoint was modified or corrupted")
        return weights

    @property
    def text_encoding(self) -> dict[str, Any] | None:
        """How the model read its text (`TextEncoding`'s fields), or None without a text encoder."""
        return self.metrics.get("text_encoder")

    def verified_text_encoder(self, what: str) -> Path:
        """The folder of the encoder's config and tokenizer files, each checked against its SHA-256.

        Raises:
            MsaError: a file missing or modified.
        """
        folder = self.folder / TEXT_ENCODER_DIR
        for name, expected in self.text_encoding["files"].items():
            path = folder / name
            if not path.is_file():
                raise MsaError(f"{what}: text encoder file {path} is missing")
            if sha256_path(path) != expected:
                raise MsaError(f"{what}: SHA-256 of {path} differs from the one {METRICS_FILE} recorded; "
                               f"the checkpoint was modified or corrupted")
        return folder

    def has_predictions(self, split: str) -> bool:
        return (self.folder / predictions_file(split)).is_file()

    def predictions(self, split: str) -> Predictions:
        """A split's stored predictions.

        Raises:
            MsaError: an empty or malformed predictions file.
        """
        path = self.folder / predictions_file(split)
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows:
            raise MsaError(f"{path} holds no predictions")
        try:
            ids = tuple(row["id"] for row in rows)
            if self.spec.task == "classification":
                columns = [c for c in rows[0] if c.startswith("prob_")]
                labels = np.asarray([int(row["label"]) for row in rows], dtype=np.int64)
                values = np.asarray([[float(row[c]) for c in columns] for row in rows])
            else:
                labels = np.asarray([float(row["label"]) for row in rows])
                values = np.asarray([float(row["prediction"]) for row in rows])
        except (KeyError, ValueError) as exc:
            raise MsaError(f"{path}: not a predictions file ({type(exc).__name__}: {exc})") from None
        return Predictions(ids=ids, labels=labels, values=values)

    def history(self) -> list[dict[str, str]]:
        with (self.folder / HISTORY_FILE).open(newline="") as handle:
            return list(csv.DictReader(handle))

    def epoch_seconds(self) -> float:
        """Seconds the run spent in its epochs (history.csv)."""
        return sum(float(row.get("epoch_seconds") or 0.0) for row in self.history())

    def files(self) -> list[Path]:
        """The files a tracking run keeps beside the whole folder: config and predictions."""
        return [self.folder / name for name in (CONFIG_FILE, *map(predictions_file, PREDICTED_SPLITS))]


class SeedGroup:
    """A trial's folder read as the seed group it holds: one checkpoint (the folder itself, for
    ``seeds`` = 1) or one per seed (its ``seed-<k>/`` folders, by seed). Its scores are the seed
    means; the group's prediction is its seeds' mean prediction."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @functools.cached_property
    def checkpoints(self) -> list[Checkpoint]:
        prefix = SEED_FOLDER_PREFIX
        seeds = [path for path in self.folder.glob(f"{prefix}*") if path.name[len(prefix):].isdigit()]
        if not seeds or Checkpoint(self.folder).exists():
            return [Checkpoint(self.folder)]
        return [Checkpoint(path) for path in sorted(seeds, key=lambda path: int(path.name[len(prefix):]))]

    def exists(self) -> bool:
        """Every seed of the group has a complete best epoch."""
        if not all(checkpoint.exists() for checkpoint in self.checkpoints):
            return False
        expected = self.checkpoints[0].metrics.get("seed_group")
        return expected is None or [c.metrics["seed"] for c in self.checkpoints] == list(expected)

    @property
    def seeds(self) -> list[int]:
        return [int(checkpoint.metrics["seed"]) for checkpoint in self.checkpoints]

    @property
    def first(self) -> Checkpoint:
        """The group's first seed: its config, spec and data are every seed's."""
        return self.checkpoints[0]

    @property
    def selection_metric(self) -> str:
        return self.first.selection_metric

    def scores(self, split: str) -> list[dict[str, float | None]]:
        """Each seed's metrics on `split` (``valid`` or ``test``) at its selected epoch."""
        return [checkpoint.metrics[split] for checkpoint in self.checkpoints]

    def mean(self, split: str) -> dict[str, float | None]:
        """The seed mean of each metric on `split` (None where a seed's is undefined)."""
        return {metric: _mean([scores.get(metric) for scores in self.scores(split)]) for metric in self.scores(split)[0]}

    def sd(self, split: str) -> dict[str, float | None]:
        """The seeds' sample standard deviation of each metric on `split` (0 for one seed)."""
        out = {}
        for metric in self.scores(split)[0]:
            values = [scores.get(metric) for scores in self.scores(split)]
            out[metric] = None if None in values else float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        return out


def _mean(values: list[float | None]) -> float | None:
    return None if None in values else float(np.mean(values))


def write_predictions(path: Path, split: Split, prediction: np.ndarray, class_names: tuple[str, ...]) -> None:
    header, rows = prediction_table(split, prediction, class_names)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


class CheckpointWriter:
    """Rank 0's writer of the checkpoint folder. Each improvement replaces the whole folder
    atomically (built in a hidden sibling, then swapped in), so the folder always holds one
    complete best epoch, even if the run is stopped or killed later."""

    def __init__(self, out_dir: Path, config, model_config, dataset: FeatureSet, *, text_encoder=None,
                 seed_group: list[int] | None = None):
        """`text_encoder`: the `EncoderInfo` of the model's encoder, whose config and tokenizer
        files each published folder keeps; `seed_group`: every seed of the group this run
        belongs to (recorded, so a reader knows when the group is whole)."""
        self.out_dir, self.config, self.dataset, self.text_encoder = out_dir, config, dataset, text_encoder
        self.seed_group = seed_group
        spec = dataset.spec
        self.resolved = {
            **to_plain(config),
            "model_config": to_plain(model_config),
            "data_spec": {"dims": spec.dims, "max_lengths": spec.max_lengths, "task": spec.task,
                          "num_classes": spec.num_classes, "class_names": list(dataset.class_names),
                          "metric_suite": dataset.metric_suite},
        }
        existing = Checkpoint(out_dir)  # a resumed run: keep the best epoch already written
        self.weights_sha256 = existing.metrics["weights_sha256"] if existing.exists() else ""

    def write_best(self, weights, predictions: dict[str, np.ndarray], best_epoch: int, valid: dict[str, float],
                   test: dict[str, float], history: list[dict[str, float]]) -> None:
        """Publish a new best epoch: `predictions` per split in `PREDICTED_SPLITS`."""
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.out_dir.parent, prefix=f".{self.out_dir.name}.", suffix=".partial"))
        try:
            staging.chmod(0o755)  # mkdtemp makes it private; the published folder should not be
            torch.save(weights, staging / WEIGHTS_FILE)
            sha = sha256_path(staging / WEIGHTS_FILE)
            (staging / CONFIG_FILE).write_text(yaml.safe_dump(self.resolved, sort_keys=False))
            for split in PREDICTED_SPLITS:
                write_predictions(staging / predictions_file(split), self.dataset.splits[split], predictions[split],
                                  self.dataset.class_names)
            _write_history(staging / HISTORY_FILE, history)
            encoder_record = self._copy_text_encoder(staging)
            metrics = {
                "model": self.config.model, "dataset": self.dataset.name, "dataset_fingerprint": self.dataset.fingerprint or None,
                "seed": self.config.seed, "best_epoch": best_epoch,
                "selection_metric": self.config.selection_metric,
                "selection_mode": METRIC_MODES[self.config.selection_metric],
                "valid": valid, "test": test, "weights_file": WEIGHTS_FILE, "weights_sha256": sha,
                # A float sum's order follows the thread count: predicting with these threads
                # reproduces the stored predictions bit for bit (Ray gives a 1-CPU trial one).
                "torch_threads": torch.get_num_threads(),
            }
            if encoder_record is not None:
                metrics["text_encoder"] = encoder_record
            if self.seed_group is not None:
                metrics["seed_group"] = self.seed_group
            (staging / METRICS_FILE).write_text(json.dumps(finite_or_none(metrics), indent=2))
            _swap_in(staging, self.out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.weights_sha256 = sha

    def _copy_text_encoder(self, staging: Path) -> dict[str, Any] | None:
        """Copy the encoder's config and tokenizer files; their digests and how the text was read."""
        if self.text_encoder is None:
            return None
        folder = staging / TEXT_ENCODER_DIR
        folder.mkdir()
        for source in [self.text_encoder.folder / "config.json", *self.text_encoder.tokenizer_files()]:
            shutil.copyfile(source, folder / source.name)
        record = to_plain(self.dataset.text_encoding)
        record["files"] = {path.name: sha256_path(path) for path in sorted(folder.iterdir())}
        return record

    def write_history(self, history: list[dict[str, float]]) -> None:
        """Replace history.csv with the whole run's history (the best epoch may not be the last)."""
        atomic_write(self.out_dir / HISTORY_FILE, lambda tmp: _write_history(tmp, history))


def _swap_in(staging: Path, target: Path) -> None:
    """Rename `staging` onto `target`; an existing `target` is moved aside first, then removed."""
    if not target.exists():
        os.replace(staging, target)
        return
    retired = target.with_name(f".{target.name}.{os.getpid()}.old")
    os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)
