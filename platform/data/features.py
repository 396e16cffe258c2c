"""`FeatureSet`: a dataset in memory, whatever file it came from, validated once.

Per split (train/valid/test): per-modality padded float32 arrays ``(N, T, d)``, their lengths,
labels and ids. Every reader returns one, and every check on the data's consistency lives here,
so a bad file fails before any model is built.

With a text encoder (`msa.platform.data.text`), the ``text`` modality is replaced by what the
encoder reads: int64 token ids ``(N, L)`` (lengths from the attention mask), or the encoder's
hidden states after its frozen layers ``(N, L, h)``; `TextEncoding` says which.
"""
from __future__ import annotations

import dataclasses
from dataclasses import InitVar, dataclass, field

import numpy as np

from msa.platform.core.errors import MsaError
from msa.platform.core.spec import MODALITIES, TASKS, DataSpec

SPLITS = ("train", "valid", "test")
LABEL_BOUNDS = {"mosi": 3.0, "sims": 1.0}


@dataclass
class Split:
    """One split of a dataset.

    Args:
        ids: ``(N,)`` clip ids (MMSA ``video$_$clip`` or ``videoid_clipno``).
        features: modality -> ``(N, T, d)`` float32, padding after the real steps.
        lengths: modality -> ``(N,)`` int64 number of real steps.
        labels: ``(N,)`` float32 scores (regression) or int64 class ids (classification).
        unimodal_labels: modality -> ``(N,)`` float32 (CH-SIMS); empty when the data has none.
        raw_text: ``(N,)`` transcripts when the file has them.
        text_bert: ``(N, 3, L)`` MMSA's BERT input (token ids, attention mask, segment ids) when
            the file has it.
    """

    ids: np.ndarray
    features: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    labels: np.ndarray
    unimodal_labels: dict[str, np.ndarray] = field(default_factory=dict)
    raw_text: np.ndarray | None = None
    text_bert: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class TextEncoding:
    """What the ``text`` modality of a `FeatureSet` holds when a text encoder reads it.

    Args:
        tokenizer_sha256: digest of the tokenizer files that made the token ids.
        max_length: tokens per clip (padded or truncated to it).
        hidden_size: the encoder's hidden size: the text dimension models are built with.
        source: where the ids came from: ``raw_text`` or ``text_bert``.
        prefix_layers: 0 for token ids; k for hidden states after the embeddings and the first
            k layers (the frozen prefix, computed once).
        encoder_sha256: digest of the encoder weights the prefix was computed with ("" for ids).
    """

    tokenizer_sha256: str
    max_length: int
    hidden_size: int
    source: str
    prefix_layers: int = 0
    encoder_sha256: str = ""


@dataclass(frozen=True)
class DatasetRecord:
    """Who a dataset is, made once by whatever made the data (a reader, the synthesizer) and the
    same everywhere after: pair and study names, run-directory paths, MLflow tags, registered
    model names, leaderboard sections and summaries all read `name` from here.

    Args:
        name: the dataset's name: the sweep's mapping key, else the file's own name (an npz's
            ``meta_json`` name, an MMSA pickle's ``name``), else the file stem.
        path: the absolute path it was read from ("" for generated data not yet written).
        sha256: SHA-256 of that file (of every file, in name order, for a folder); for generated
            data, of the MMSA pickle it is written as.
        task: ``"regression"`` or ``"classification"``.
        metric_suite: ``"mosi"``, ``"sims"`` or ``"classification"``.
    """

    name: str
    path: str
    sha256: str
    task: str
    metric_suite: str


@dataclass
class FeatureSet:
    """A validated dataset: three splits and its `DatasetRecord`.

    Args:
        record: its identity (name, path, SHA-256, task, metric suite).
        splits: ``{"train": Split, "valid": Split, "test": Split}``.
        class_names: class names for classification, in class-id order.
        text_encoding: set when ``text`` holds a text encoder's input (see `TextEncoding`).
        validate: check every array (``False`` only where the arrays were checked before).

    Raises:
        MsaError: naming the split and modality when the data is inconsistent.
    """

    record: DatasetRecord
    splits: dict[str, Split]
    class_names: tuple[str, ...] = ()
    text_encoding: TextEncoding | None = None
    validate: InitVar[bool] = True

    def __post_init__(self, validate: bool) -> None:
        if validate:
            self._validate()

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def task(self) -> str:
        return self.record.task

    @property
    def metric_suite(self) -> str:
        return self.record.metric_suite

    @property
    def source(self) -> str:
        return self.record.path

    @property
    def fingerprint(self) -> str:
        return self.record.sha256

    def with_text(self, text: dict[str, tuple[np.ndarray, np.ndarray]], encoding: TextEncoding) -> "FeatureSet":
        """This dataset with its ``text`` modality replaced: per split, ``(array, lengths)`` as
        `encoding` describes. Only the new arrays' shapes are checked: the other modalities were
        checked when this dataset was made, and the text arrays where they were computed."""
        splits = {}
        for name, split in self.splits.items():
            array, lengths = text[name]
            if array.shape[0] != len(split) or lengths.shape != (len(split),):
                self._fail(f"split {name!r}: {array.shape[0]} text rows and {lengths.shape} lengths for {len(split)} clips")
            others = [m for m in split.features if m != "text"]
            splits[name] = dataclasses.replace(
                split, features={"text": array, **{m: split.features[m] for m in others}},
                lengths={"text": lengths, **{m: split.lengths[m] for m in others}})
        return FeatureSet(record=self.record, splits=splits, class_names=self.class_names, text_encoding=encoding,
                          validate=False)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.splits["train"].features)

    @property
    def spec(self) -> DataSpec:
        train = self.splits["train"]
        dims = {m: int(train.features[m].shape[-1]) for m in self.modalities}
        if self.text_encoding is not None:
            dims["text"] = self.text_encoding.hidden_size
        return DataSpec(
            dims=dims,
            max_lengths={m: int(train.features[m].shape[1]) for m in self.modalities},
            task=self.task,
            num_classes=len(self.class_names),
        )

    def _fail(self, message: str) -> None:
        raise MsaError(f"{self.source or self.name}: {message}")

    def _validate(self) -> None:
        if self.task not in TASKS:
            self._fail(f"unknown task {self.task!r}; expected one of {', '.join(TASKS)}")
        missing = [s for s in SPLITS if s not in self.splits]
        if missing:
            self._fail(f"split {missing[0]!r} is missing (a dataset needs {', '.join(SPLITS)})")
        modalities = self.modalities
        if not modalities:
            self._fail("no modality found (expected any of text, audio, vision)")
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown:
            self._fail(f"unknown modality {unknown[0]!r}; expected any of {', '.join(MODALITIES)}")
        if self.task == "classification" and len(self.class_names) < 2:
            self._fail("classification data needs at least 2 class names")
        reference_dims = {m: self.splits["train"].features[m].shape[2:] for m in modalities}
        if self.text_encoding is not None and self.text_encoding.prefix_layers == 0:
            reference_dims["text"] = ()  # token ids: (N, L)
        for split_name in SPLITS:
            self._validate_split(split_name, self.splits[split_name], reference_dims)

    def _validate_split(self, split_name: str, split: Split, reference_dims: dict) -> None:
        n = len(split.ids)
        if n == 0:
            self._fail(f"split {split_name!r} is empty")
        if set(split.features) != set(reference_dims):
            self._fail(
                f"split {split_name!r} has modalities {sorted(split.features)}, "
                f"train has {sorted(reference_dims)}"
            )
        for m, array in split.features.items():
            where = f"split {split_name!r}, modality {m!r}"
            if not reference_dims[m]:
                if array.ndim != 2 or array.dtype != np.int64 or (array < 0).any():
                    self._fail(f"{where}: token ids must be a (N, L) int64 array of ids >= 0, got {array.dtype} {array.shape}")
            elif array.ndim != 3:
                self._fail(f"{where}: expected a (N, T, d) array, got shape {array.shape}")
            elif array.shape[2:] != reference_dims[m]:
                self._fail(
                    f"{where}: feature dim {array.shape[2]} differs from train's {reference_dims[m][0]}"
                )
            if array.shape[0] != n:
                self._fail(f"{where}: {array.shape[0]} rows but {n} ids")
            bad_rows = int((~np.isfinite(array)).any(axis=(1, 2)).sum()) if array.ndim == 3 else 0
            if bad_rows:
                self._fail(f"{where}: {bad_rows} rows contain NaN or inf features")
            lengths = split.lengths.get(m)
            if lengths is None or lengths.shape != (n,):
                self._fail(f"{where}: lengths missing or not one per row")
            if (lengths < 0).any() or (lengths > array.shape[1]).any():
                self._fail(f"{where}: lengths must lie in [0, {array.shape[1]}]")
        self._validate_labels(split_name, split.labels, n)
        for m, labels in split.unimodal_labels.items():
            self._validate_labels(f"{split_name} ({m} unimodal)", labels, n)

    def _validate_labels(self, split_name: str, labels: np.ndarray, n: int) -> None:
        where = f"split {split_name!r} labels"
        if labels.shape != (n,):
            self._fail(f"{where}: expected {n} labels, got shape {labels.shape}")
        if self.task == "regression":
            if not np.isfinite(labels).all():
                self._fail(f"{where}: NaN or inf labels")
            bound = LABEL_BOUNDS[self.metric_suite]
            if np.abs(labels).max() > bound:
                self._fail(
                    f"{where}: values out of range [-{bound:g}, {bound:g}] for the "
                    f"{self.metric_suite} scale (max |y| = {np.abs(labels).max():.3g})"
                )
        else:
            num_classes = len(self.class_names)
            if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= num_classes:
                self._fail(f"{where}: class ids must be integers in [0, {num_classes - 1}]")
