"""Ensemble members: which checkpoints, verified, and their predictions as aligned matrices.

A sweep's finished trials are read from its Optuna studies (COMPLETE and PRUNED trials: a pruned
trial's checkpoint holds its best epoch so far, selected on valid like any other), or from the
trial runs of an MLflow experiment. Per dataset the best `top_k` trials of each model by the valid
selection metric become members. Every member's weights are checked against the SHA-256 its
``metrics.json`` recorded, and its stored valid/test predictions are read (recomputed from the
checkpoint when a predictions file is missing). Members must predict the same clips: the first
member's ids are the reference, and a member with another id set is an error that names it.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from msa.ensembles.matrix import PredictionMatrix
from msa.platform.errors import MsaError
from msa.platform.features import FeatureSet
from msa.platform.metrics import METRIC_MODES
from msa.platform.readers import load_dataset, sha256_path

ENSEMBLE_SPLITS = ("valid", "test")


@dataclass(frozen=True)
class Candidate:
    """A finished trial whose checkpoint folder could be a member."""

    model: str
    dataset: str
    pair: str
    trial_id: str
    folder: Path
    selection_metric: str
    valid_score: float
    best_epoch: int
    mlflow_run_id: str = ""

    @property
    def name(self) -> str:
        return f"{self.model}/{self.trial_id}"


@dataclass
class Member:
    """A verified member: per split, clip ids, labels and predictions (``(N,)`` or ``(N, C)``)."""

    candidate: Candidate
    task: str
    ids: dict[str, tuple[str, ...]] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    recomputed: bool = False

    @property
    def name(self) -> str:
        return self.candidate.name


def candidate_from_folder(folder: Path, pair: str, trial_id: str, run_id: str = "") -> Candidate:
    """A checkpoint folder (written by `train_loop`) as a candidate, from its metrics.json."""
    stored = json.loads((folder / "metrics.json").read_text())
    metric = stored["selection_metric"]
    score = stored["valid"].get(metric)
    return Candidate(model=stored["model"], dataset=stored["dataset"], pair=pair, trial_id=trial_id, folder=folder,
                     selection_metric=metric, valid_score=float("nan") if score is None else float(score),
                     best_epoch=int(stored["best_epoch"]), mlflow_run_id=run_id)


def sweep_candidates(run_dir: Path) -> list[Candidate]:
    """The finished (COMPLETE or PRUNED) trials of every study of a sweep run directory."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    candidates = []
    for database in sorted((run_dir / "optuna").glob("*.db")):
        pair, storage = database.stem, f"sqlite:///{database}"
        if pair not in optuna.get_all_study_names(storage):  # interrupted before its study was written
            continue
        study = optuna.load_study(study_name=pair, storage=storage)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            trial_id = trial.user_attrs.get("ray_trial_id", "")
            folder = run_dir / "trials" / pair / trial_id
            if trial_id and (folder / "metrics.json").is_file():
                candidates.append(candidate_from_folder(folder, pair, trial_id))
    return candidates


def experiment_candidates(uri: str, experiment: str, download_to: Path) -> list[Candidate]:
    """The finished trial runs of MLflow experiment `experiment`, their checkpoints downloaded."""
    from msa.platform.mlflow_server import client
    from msa.platform.tracking import PAIR_TAG, ROLE_TAG, STATE_TAG, TRIAL_TAG

    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        raise MsaError(f"no MLflow experiment named {experiment!r} at {uri}")
    runs = mlflow_client.search_runs([found.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'trial'",
                                     max_results=10000)
    candidates = []
    for run in runs:
        tags = run.data.tags
        if tags.get(STATE_TAG) not in ("complete", "pruned") or run.info.status != "FINISHED":
            continue
        target = download_to / tags[PAIR_TAG] / tags[TRIAL_TAG]
        if not (target / "metrics.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            mlflow_client.download_artifacts(run.info.run_id, "checkpoint", str(target.parent))
            (target.parent / "checkpoint").rename(target)
        candidates.append(candidate_from_folder(target, tags[PAIR_TAG], tags[TRIAL_TAG], run.info.run_id))
    return candidates


def select_top_k(candidates: list[Candidate], top_k: int) -> dict[str, list[Candidate]]:
    """Per dataset, the `top_k` best trials of each model by the valid selection metric.

    Raises:
        MsaError: no finished trial, top_k < 1 or larger than a model's number of finished
            trials, or two selection metrics on one dataset.
    """
    if top_k < 1:
        raise MsaError(f"top_k must be >= 1, got {top_k}")
    if not candidates:
        raise MsaError("no finished trial with a checkpoint: nothing to ensemble (did the sweep run to completion?)")
    chosen: dict[str, list[Candidate]] = {}
    for dataset in sorted({c.dataset for c in candidates}):
        of_dataset = [c for c in candidates if c.dataset == dataset]
        metrics = sorted({c.selection_metric for c in of_dataset})
        if len(metrics) > 1:
            raise MsaError(f"dataset {dataset}: trials were selected on different metrics ({', '.join(metrics)}); "
                           "ensemble trials of one sweep")
        for model in sorted({c.model for c in of_dataset}):
            trials = [c for c in of_dataset if c.model == model and not np.isnan(c.valid_score)]
            if top_k > len(trials):
                raise MsaError(f"top_k {top_k} is larger than the {len(trials)} finished trials of model {model} on "
                               f"{dataset}; lower --top-k to at most {len(trials)}")
            chosen.setdefault(dataset, []).extend(sorted(trials, key=_rank_key)[:top_k])
        chosen[dataset].sort(key=_rank_key)
    return chosen


def _rank_key(candidate: Candidate) -> tuple[float, str]:
    sign = 1.0 if METRIC_MODES[candidate.selection_metric] == "min" else -1.0
    return sign * candidate.valid_score, candidate.name


class DatasetCache:
    """Datasets read for recomputing predictions, each once, checked against the fingerprint
    the trial recorded."""

    def __init__(self) -> None:
        self._loaded: dict[str, FeatureSet] = {}

    def get(self, path: str, fingerprint: str | None, *, member: str) -> FeatureSet:
        if path not in self._loaded:
            if not Path(path).exists():
                raise MsaError(f"member {member}: its dataset {path} is gone; cannot recompute its predictions")
            dataset = load_dataset(path)
            dataset.fingerprint = sha256_path(path)
            self._loaded[path] = dataset
        dataset = self._loaded[path]
        if fingerprint and dataset.fingerprint != fingerprint:
            raise MsaError(f"member {member}: dataset {path} changed since training (SHA-256 {dataset.fingerprint[:12]}... "
                           f"!= recorded {fingerprint[:12]}...)")
        return dataset


def load_member(candidate: Candidate, datasets: DatasetCache) -> Member:
    """Verify `candidate`'s weights and read (or recompute) its valid and test predictions.

    Raises:
        MsaError: missing weights, a SHA-256 mismatch, or unreadable predictions.
    """
    from msa.platform.train import verify_checkpoint_weights

    folder = candidate.folder
    verify_checkpoint_weights(folder, f"member {candidate.name}")
    stored = json.loads((folder / "metrics.json").read_text())
    config = yaml.safe_load((folder / "config.yaml").read_text())
    member = Member(candidate=candidate, task=config["data_spec"]["task"])
    missing = [s for s in ENSEMBLE_SPLITS if not (folder / f"predictions_{s}.csv").is_file()]
    for split in ENSEMBLE_SPLITS:
        if split not in missing:
            member.ids[split], member.labels[split], member.predictions[split] = read_predictions(
                folder / f"predictions_{split}.csv", member.task)
    if missing:
        _recompute(member, config, stored.get("dataset_fingerprint"), missing, datasets)
    return member


def read_predictions(path: Path, task: str) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """Ids, labels and predictions of a checkpoint's predictions CSV (see `train.prediction_table`)."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise MsaError(f"{path} holds no predictions")
    try:
        ids = tuple(row["id"] for row in rows)
        if task == "classification":
            columns = [c for c in rows[0] if c.startswith("prob_")]
            labels = np.asarray([int(row["label"]) for row in rows], dtype=np.int64)
            predictions = np.asarray([[float(row[c]) for c in columns] for row in rows])
        else:
            labels = np.asarray([float(row["label"]) for row in rows])
            predictions = np.asarray([float(row["prediction"]) for row in rows])
    except (KeyError, ValueError) as exc:
        raise MsaError(f"{path}: not a predictions file ({type(exc).__name__}: {exc})") from None
    return ids, labels, predictions


def _recompute(member: Member, config: dict, fingerprint: str | None, splits: list[str], datasets: DatasetCache) -> None:
    from msa.platform.model_registry import LoadedCheckpoint, split_inputs

    dataset = datasets.get(config["data"], fingerprint, member=member.name)
    checkpoint = LoadedCheckpoint(member.candidate.folder)
    for split in splits:
        part = dataset.splits[split]
        member.ids[split] = tuple(str(i) for i in part.ids)
        member.labels[split] = np.asarray(part.labels)
        member.predictions[split] = checkpoint.predict(split_inputs(part, checkpoint.spec.modalities))
    member.recomputed = True


def prediction_matrix(members: list[Member], split: str) -> PredictionMatrix:
    """Stack the members' predictions on `split`, rows in the first member's id order.

    Raises:
        MsaError: a member whose ids (as a set) or labels differ from the first member's.
    """
    reference = members[0]
    ids, labels = reference.ids[split], reference.labels[split]
    columns = []
    for member in members:
        if member.ids[split] == ids:
            order = np.arange(len(ids))
        else:
            own = set(member.ids[split])
            if own != set(ids):
                missing, extra = sorted(set(ids) - own), sorted(own - set(ids))
                raise MsaError(f"member {member.name} predicts other {split} clips than {reference.name}: "
                               f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} extra (e.g. {extra[:2]})")
            position = {clip: i for i, clip in enumerate(member.ids[split])}
            order = np.asarray([position[clip] for clip in ids])
        if not np.allclose(member.labels[split][order], labels):
            raise MsaError(f"member {member.name} has other {split} labels than {reference.name} for the same clips; "
                           "members must come from one dataset")
        columns.append(member.predictions[split][order])
    return PredictionMatrix(split=split, ids=ids, labels=labels, predictions=np.stack(columns, axis=1),
                            members=tuple(m.name for m in members), task=reference.task)
