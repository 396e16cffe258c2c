"""Readers that turn data files into a `FeatureSet`, and the writers for our own formats.

Formats, detected from the path (not the extension):

* the project's ``.npz`` (a zip archive; read with ``allow_pickle=False``): per split ``s``,
  ``{s}_id``, ``{s}_{m}`` ``(N, T, d)`` and ``{s}_{m}_lengths`` for each modality ``m`` present,
  ``{s}_regression_labels`` or ``{s}_classification_labels``, optional ``{s}_raw_text`` and
  ``{s}_regression_labels_{T,A,V}``; optional ``meta_json`` with ``class_names`` and ``label_scale``.
* MMSA pickles (``aligned_50.pkl``, ``unaligned_50.pkl``, SIMS ``unaligned_39.pkl``): a dict of
  splits with ``id``, ``raw_text``, ``text``/``audio``/``vision``, ``audio_lengths``,
  ``vision_lengths``, ``regression_labels`` (or ``classification_labels``), for CH-SIMS
  ``regression_labels_T/A/V``, and optionally ``text_bert`` (BERT token ids, mask, segments). **Unpickling runs code**: only paths the user names are read.
* a MIntRec folder: ``train.tsv``/``dev.tsv``/``test.tsv`` (season, episode, clip, text, label) and
  feature pickles ``video_feats.pkl``, ``audio_feats.pkl`` and optionally ``text_feats.pkl``
  (each a dict ``"season_episode_clip" -> (T, d)``), found anywhere under the folder.
"""
from __future__ import annotations

import csv
import hashlib
import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msa.platform.core.errors import MsaError
from msa.platform.core.files import atomic_write, sha256_path
from msa.platform.core.spec import MODALITIES
from msa.platform.data.features import SPLITS, DatasetRecord, FeatureSet, Split

UNIMODAL_SUFFIXES = {"text": "T", "audio": "A", "vision": "V"}
MINTREC_INTENTS = (
    "Complain", "Praise", "Apologise", "Thank", "Criticize", "Agree", "Taunt", "Flaunt", "Joke",
    "Oppose", "Comfort", "Care", "Inform", "Advise", "Arrange", "Introduce", "Leave", "Prevent",
    "Greet", "Ask for help",
)
MINTREC_SPLIT_FILES = {"train": "train.tsv", "valid": "dev.tsv", "test": "test.tsv"}
INFER_ROWS = 1024
MINTREC_FEATURE_FILES = {"text": "text_feats.pkl", "audio": "audio_feats.pkl", "vision": "video_feats.pkl"}


def load_dataset(path: str | Path, *, name: str | None = None, replace_nonfinite: bool = False) -> FeatureSet:
    """Read an npz file, an MMSA pickle or a MIntRec folder into a validated `FeatureSet`, with
    its `DatasetRecord` (the file is hashed here, once).

    Args:
        path: the file or folder, as the user named it.
        name: the dataset's name; default: the file's own (npz ``meta_json``, pickle ``name``,
            MIntRec folder name), else its stem.
        replace_nonfinite: set NaN and +-inf features to 0 (what MMSA does for MOSEI) instead of
            refusing the file.

    Raises:
        MsaError: the path is missing, of no known format, or its contents are inconsistent.
    """
    path = Path(path)  # as given: errors name it so
    if not path.exists():
        raise MsaError(f"data file not found: {path}")
    if path.is_dir():
        read = _read_mintrec
    else:
        with path.open("rb") as handle:
            head = handle.read(4)
        if head.startswith(b"PK"):
            read = _read_npz
        elif head[:1] == b"\x80":
            read = _read_mmsa_pickle
        else:
            raise MsaError(f"{path}: not an .npz archive, an MMSA pickle or a MIntRec folder")
    split_fields, meta = read(path, replace_nonfinite)
    return assemble(DatasetSource(name=name or meta.get("name") or path.resolve().stem, path=str(path.resolve()),
                                  sha256=sha256_path(path)), split_fields, meta)


def infer_lengths(features: np.ndarray) -> np.ndarray:
    """Number of steps up to the last step that is not all zeros, per row of ``(N, T, d)``;
    `INFER_ROWS` rows at a time, so that no temporary of the features' size is made (CMU-MOSEI's
    text features are 2.5 GB)."""
    nonzero = np.empty(features.shape[:2], dtype=bool)  # (N, T)
    for start in range(0, len(features), INFER_ROWS):
        nonzero[start:start + INFER_ROWS] = (features[start:start + INFER_ROWS] != 0).any(axis=2)
    last = features.shape[1] - np.argmax(nonzero[:, ::-1], axis=1)
    return np.where(nonzero.any(axis=1), last, 0).astype(np.int64)


def _features(array: Any, where: str, replace_nonfinite: bool) -> np.ndarray:
    try:
        features = np.asarray(array, dtype=np.float32)
    except (TypeError, ValueError):
        raise MsaError(f"{where}: features are not a numeric array") from None
    if features.ndim == 2:  # utterance-level features: one step per clip
        features = features[:, None, :]
    if replace_nonfinite:
        features = np.nan_to_num(features, nan=0.0, posinf=0.0, neginf=0.0)
    return features


def _regression_labels(array: Any) -> np.ndarray:
    labels = np.asarray(array, dtype=np.float32)
    return labels.reshape(-1) if labels.ndim == 2 and labels.shape[1] == 1 else labels


def _class_names(labels: list[np.ndarray], given: Any) -> tuple[str, ...]:
    if given is not None:
        return tuple(str(name) for name in given)
    top = max(int(np.max(y)) for y in labels if len(y))
    return tuple(f"class_{i}" for i in range(top + 1))


@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset's arrays came from: the part of its `DatasetRecord` the data does not say."""

    name: str
    path: str
    sha256: str


def assemble(source: DatasetSource, split_fields: dict[str, dict[str, Any]], meta: dict[str, Any]) -> FeatureSet:
    """A validated FeatureSet (and its record) from the per-split fields every reader produces."""
    where = source.path or source.name
    task = "regression" if all("regression_labels" in f for f in split_fields.values()) else "classification"
    has_unimodal = any(f.get("unimodal_labels") for f in split_fields.values())
    suite = "classification"
    if task == "regression":
        suite = meta.get("label_scale") or ("sims" if has_unimodal else "mosi")
        if suite not in ("mosi", "sims"):
            raise MsaError(f"{where}: label_scale {suite!r} is not 'mosi' or 'sims'")
    class_names: tuple[str, ...] = ()
    if task == "classification":
        class_names = _class_names(
            [f["classification_labels"] for f in split_fields.values()], meta.get("class_names")
        )
    splits = {}
    for name, f in split_fields.items():
        labels = f["regression_labels"] if task == "regression" else f["classification_labels"]
        splits[name] = Split(
            ids=f["ids"], features=f["features"], lengths=f["lengths"], labels=labels,
            unimodal_labels=f.get("unimodal_labels", {}), raw_text=f.get("raw_text"), text_bert=f.get("text_bert"),
        )
    record = DatasetRecord(name=source.name, path=source.path, sha256=source.sha256, task=task, metric_suite=suite)
    return FeatureSet(record=record, splits=splits, class_names=class_names)


def _read_npz(path: Path, replace_nonfinite: bool) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    try:
        archive = np.load(path, allow_pickle=False)
        keys = set(archive.files)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise MsaError(f"{path}: not a readable .npz archive ({exc})") from None

    def get(key: str) -> np.ndarray:
        try:
            return archive[key]
        except ValueError:
            raise MsaError(f"{path}: key {key!r} holds Python objects; the .npz format stores plain arrays only") from None
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise MsaError(f"{path}: array {key!r} is corrupt ({exc})") from None

    meta = json.loads(str(get("meta_json"))) if "meta_json" in keys else {}
    if not any(f"{s}_id" in keys for s in SPLITS):
        raise MsaError(f"{path}: no '<split>_id' keys; not a dataset in the msa .npz format")
    split_fields = {}
    for s in SPLITS:
        if f"{s}_id" not in keys:
            continue
        fields: dict[str, Any] = {"ids": get(f"{s}_id").astype(str), "features": {}, "lengths": {}}
        for m in MODALITIES:
            if f"{s}_{m}" in keys:
                features = _features(get(f"{s}_{m}"), f"{path} split {s!r} modality {m!r}", replace_nonfinite)
                fields["features"][m] = features
                length_key = f"{s}_{m}_lengths"
                fields["lengths"][m] = (
                    get(length_key).astype(np.int64) if length_key in keys else infer_lengths(features)
                )
        _label_fields(fields, {k[len(s) + 1:]: get(k) for k in keys if k.startswith(f"{s}_")}, f"{path} split {s!r}")
        if f"{s}_raw_text" in keys:
            fields["raw_text"] = get(f"{s}_raw_text").astype(str)
        split_fields[s] = fields
    return split_fields, meta


def _label_fields(fields: dict[str, Any], raw: dict[str, Any], where: str) -> None:
    """Copy regression/classification/unimodal labels from a split's raw mapping into `fields`."""
    if "regression_labels" in raw:
        fields["regression_labels"] = _regression_labels(raw["regression_labels"])
        fields["unimodal_labels"] = {
            m: _regression_labels(raw[f"regression_labels_{suffix}"])
            for m, suffix in UNIMODAL_SUFFIXES.items()
            if f"regression_labels_{suffix}" in raw
        }
    elif "classification_labels" in raw:
        labels = np.asarray(raw["classification_labels"]).reshape(-1)
        if labels.dtype.kind == "f" and np.all(labels == np.round(labels)):
            labels = labels.astype(np.int64)
        fields["classification_labels"] = labels
    else:
        raise MsaError(f"{where}: no 'regression_labels' or 'classification_labels'")


def _read_mmsa_pickle(path: Path, replace_nonfinite: bool) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    try:
        with path.open("rb") as handle:
            data = pickle.load(handle)  # noqa: S301 - only paths the user named (see module docstring)
    except Exception as exc:  # a corrupt pickle can raise nearly anything
        raise MsaError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or not any(s in data for s in SPLITS):
        raise MsaError(f"{path}: pickle lacks the MMSA keys (a dict with 'train', 'valid', 'test' splits)")
    split_fields = {}
    for s in SPLITS:
        if s not in data:
            continue
        raw = data[s]
        where = f"{path} split {s!r}"
        if not isinstance(raw, dict) or "id" not in raw:
            raise MsaError(f"{where}: lacks the MMSA keys ('id', features, 'regression_labels')")
        fields: dict[str, Any] = {"ids": np.asarray(raw["id"]).astype(str), "features": {}, "lengths": {}}
        for m in MODALITIES:
            if m not in raw:
                continue
            features = _features(raw[m], f"{where} modality {m!r}", replace_nonfinite)
            fields["features"][m] = features
            if f"{m}_lengths" in raw:
                lengths = np.asarray(raw[f"{m}_lengths"]).reshape(-1).astype(np.int64)
            elif m == "text" and "text_bert" in raw:  # (N, 3, T): ids, attention mask, segments
                lengths = np.asarray(raw["text_bert"])[:, 1, :].sum(axis=1).astype(np.int64)
            else:
                lengths = infer_lengths(features)
            fields["lengths"][m] = lengths
        if not fields["features"]:
            raise MsaError(f"{where}: no 'text', 'audio' or 'vision' features")
        _label_fields(fields, raw, where)
        if "raw_text" in raw:
            fields["raw_text"] = np.asarray(raw["raw_text"]).astype(str)
        if "text_bert" in raw:
            fields["text_bert"] = _text_bert(raw["text_bert"], len(fields["ids"]), where)
        split_fields[s] = fields
    return split_fields, {k: data[k] for k in ("class_names", "label_scale", "name") if k in data}


def _text_bert(array: Any, n: int, where: str) -> np.ndarray:
    """MMSA's ``text_bert`` as ``(N, 3, L)`` int64: token ids, attention mask, segment ids."""
    try:
        ids = np.asarray(array).astype(np.int64)
    except (TypeError, ValueError):
        raise MsaError(f"{where}: text_bert is not a numeric array") from None
    if ids.ndim != 3 or ids.shape[:2] != (n, 3):
        raise MsaError(f"{where}: text_bert must have shape (N={n}, 3, L), got {ids.shape}")
    return ids


def _read_mintrec(folder: Path, replace_nonfinite: bool) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    for split_file in MINTREC_SPLIT_FILES.values():
        if not (folder / split_file).is_file():
            raise MsaError(f"{folder}: not a MIntRec folder ({split_file} missing) and not a data file")
    feature_maps = {}
    for m, file_name in MINTREC_FEATURE_FILES.items():
        found = sorted(folder.rglob(file_name))
        if found:
            try:
                with found[0].open("rb") as handle:
                    feature_maps[m] = (found[0], pickle.load(handle))  # noqa: S301 - user-named folder
            except Exception as exc:  # a corrupt pickle can raise nearly anything
                raise MsaError(f"{found[0]}: not a readable pickle ({type(exc).__name__}: {exc})") from None
            if not isinstance(feature_maps[m][1], dict):
                raise MsaError(f"{found[0]}: expected a dict of clip id -> (T, d) features")
    if not feature_maps:
        raise MsaError(f"{folder}: no feature file found ({', '.join(MINTREC_FEATURE_FILES.values())})")
    label_ids = {name: i for i, name in enumerate(MINTREC_INTENTS)}
    split_fields = {}
    for s, split_file in MINTREC_SPLIT_FILES.items():
        ids, texts, labels = [], [], []
        with (folder / split_file).open(newline="") as handle:
            rows = list(csv.reader(handle, delimiter="\t"))
        if len(rows) < 2:
            raise MsaError(f"{folder / split_file}: split {s!r} is empty")
        for row in rows[1:]:
            if len(row) < 5:
                raise MsaError(f"{folder / split_file}: row {row!r} has fewer than 5 columns")
            if row[4] not in label_ids:
                raise MsaError(f"{folder / split_file}: unknown intent label {row[4]!r}")
            ids.append("_".join(row[:3]))
            texts.append(row[3])
            labels.append(label_ids[row[4]])
        fields: dict[str, Any] = {
            "ids": np.asarray(ids), "raw_text": np.asarray(texts), "features": {}, "lengths": {},
            "classification_labels": np.asarray(labels, dtype=np.int64),
        }
        for m, (feature_path, mapping) in feature_maps.items():
            missing = [i for i in ids if i not in mapping]
            if missing:
                raise MsaError(f"{feature_path}: no features for clip {missing[0]!r} of {split_file}")
            sequences = [np.asarray(mapping[i], dtype=np.float32).reshape(-1, np.shape(mapping[i])[-1]) for i in ids]
            padded, fields["lengths"][m] = _pad(sequences, f"{feature_path} ({s} split)")
            fields["features"][m] = _features(padded, str(feature_path), replace_nonfinite)
        split_fields[s] = fields
    return split_fields, {"class_names": MINTREC_INTENTS, "name": folder.name}


def _pad(sequences: list[np.ndarray], where: str) -> tuple[np.ndarray, np.ndarray]:
    """Stack ``(T_i, d)`` sequences into ``(N, max T, d)`` with zero padding at the end."""
    lengths = np.asarray([len(x) for x in sequences], dtype=np.int64)
    dims = {x.shape[1] for x in sequences}
    if len(dims) != 1:
        raise MsaError(f"{where}: feature dims differ between clips: {sorted(dims)}")
    out = np.zeros((len(sequences), max(lengths.max(), 1), dims.pop()), dtype=np.float32)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = seq
    return out, lengths


def write_npz(dataset: FeatureSet, path: Path) -> None:
    """Write `dataset` in the project's .npz format (no pickled objects)."""
    arrays: dict[str, np.ndarray] = {}
    label_key = "regression_labels" if dataset.task == "regression" else "classification_labels"
    for s, split in dataset.splits.items():
        arrays[f"{s}_id"] = split.ids.astype(str)
        arrays[f"{s}_{label_key}"] = split.labels
        for m in split.features:
            arrays[f"{s}_{m}"] = split.features[m]
            arrays[f"{s}_{m}_lengths"] = split.lengths[m]
        for m, labels in split.unimodal_labels.items():
            arrays[f"{s}_regression_labels_{UNIMODAL_SUFFIXES[m]}"] = labels
        if split.raw_text is not None:
            arrays[f"{s}_raw_text"] = split.raw_text.astype(str)
    meta = {"name": dataset.name, "label_scale": dataset.metric_suite, "class_names": list(dataset.class_names)}
    arrays["meta_json"] = np.asarray(json.dumps(meta))

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            np.savez_compressed(handle, **arrays)

    atomic_write(path, write)


def _mmsa_mapping(dataset: FeatureSet) -> dict[str, Any]:
    """`dataset` in the MMSA pickle schema (text lengths are implied by zero padding)."""
    label_key = "regression_labels" if dataset.task == "regression" else "classification_labels"
    data: dict[str, Any] = {}
    for s, split in dataset.splits.items():
        raw: dict[str, Any] = {"id": split.ids.astype(str), label_key: split.labels}
        if split.raw_text is not None:
            raw["raw_text"] = split.raw_text
        if split.text_bert is not None:
            raw["text_bert"] = split.text_bert
        for m in split.features:
            raw[m] = split.features[m]
            if m != "text":
                raw[f"{m}_lengths"] = split.lengths[m]
        for m, labels in split.unimodal_labels.items():
            raw[f"regression_labels_{UNIMODAL_SUFFIXES[m]}"] = labels
        data[s] = raw
    data["name"] = dataset.name
    if dataset.class_names:
        data["class_names"] = list(dataset.class_names)
    if dataset.task == "regression":
        data["label_scale"] = dataset.metric_suite
    return data


class _HashingSink:
    """A write-only file that keeps only the SHA-256 of what is written to it."""

    def __init__(self):
        self.digest = hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return len(data)


def mmsa_pickle_sha256(dataset: FeatureSet) -> str:
    """The SHA-256 of the file `write_mmsa_pickle` would write, without writing it."""
    sink = _HashingSink()
    pickle.dump(_mmsa_mapping(dataset), sink, protocol=4)
    return sink.digest.hexdigest()


def write_mmsa_pickle(dataset: FeatureSet, path: Path) -> None:
    """Write `dataset` in the MMSA pickle schema (text lengths are implied by zero padding)."""
    data = _mmsa_mapping(dataset)

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            pickle.dump(data, handle, protocol=4)

    atomic_write(path, write)
