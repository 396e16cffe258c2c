"""Ensemble members: which checkpoints, verified, and their predictions as aligned matrices.

A sweep's finished trials are read from its Optuna studies (COMPLETE and PRUNED trials: a pruned
trial's checkpoint holds its best epoch so far, selected on valid like any other), or from the
trial runs of an MLflow experiment. A trial of a sweep with several seeds per trial is a seed
group: one member, scored on its seed mean, predicting its seeds' mean. Per dataset the best `top_k` trials of each model by the valid
selection metric become members. Every member's weights are checked against the SHA-256 its
``metrics.json`` recorded, and its stored valid/test predictions are read (recomputed from the
checkpoint when a predictions file is missing). Members must predict the same clips: the first
member's ids are the reference, and a member with another id set is an error that names it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from msa.ensembles.matrix import PredictionMatrix
from msa.platform.core.errors import MsaError
from msa.platform.core.metrics import loss_of
from msa.platform.core.run_dir import RunDir
from msa.platform.data.features import FeatureSet
from msa.platform.data.readers import load_dataset
from msa.platform.sweep.warm_start import own_trials
from msa.platform.tracking.client import PAIR_TAG, ROLE_TAG, STATE_TAG, TRIAL_TAG, client
from msa.platform.tracking.pyfunc import LoadedCheckpoint
from msa.platform.training.checkpoint import PREDICTED_SPLITS, Checkpoint, SeedGroup

ENSEMBLE_SPLITS = PREDICTED_SPLITS


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
    folders: tuple[Path, ...] = ()  # its checkpoint folders: `folder` itself, or a seed group's, one per seed

    @property
    def name(self) -> str:
        return f"{self.model}/{self.trial_id}"

    def seed_candidates(self) -> list["Candidate"]:
        """Each seed of a seed group as a candidate of its own (one checkpoint: itself)."""
        if len(self.folders) <= 1:
            return [self]
        return [candidate_from_folder(folder, self.pair, f"{self.trial_id}-{folder.name}") for folder in self.folders]


@dataclass
class Member:
    """A verified member: per split, clip ids, labels and predictions (``(N,)`` or ``(N, C)``)."""

    candidate: Candidate
    task: str
    ids: dict[str, tuple[str, ...]] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    recomputed: bool = False
    seeds: list["Member"] = field(default_factory=list)  # a seed group's seeds; its predictions are their mean

    @property
    def name(self) -> str:
        return self.candidate.name


def candidate_from_folder(folder: Path, pair: str, trial_id: str, run_id: str = "") -> Candidate:
    """A checkpoint folder (written by `train_loop`), or a seed group's, as a candidate, from
    metrics.json (a group's valid score is its seed mean, as its trial reported it)."""
    group = SeedGroup(folder)
    stored = group.first.metrics
    metric = stored["selection_metric"]
    score = group.mean("valid").get(metric)
    best_epoch = round(sum(c.metrics["best_epoch"] for c in group.checkpoints) / len(group.checkpoints))
    return Candidate(model=stored["model"], dataset=stored["dataset"], pair=pair, trial_id=trial_id, folder=folder,
                     selection_metric=metric, valid_score=float("nan") if score is None else float(score),
                     best_epoch=best_epoch, mlflow_run_id=run_id, folders=tuple(c.folder for c in group.checkpoints))


def sweep_candidates(run_dir: Path) -> list[Candidate]:
    """The finished (COMPLETE or PRUNED) trials of every study of a sweep run directory."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run_dir = RunDir(run_dir)
    candidates = []
    for database in run_dir.study_dbs():
        pair, storage = database.stem, run_dir.study_url(database.stem)
        if pair not in optuna.get_all_study_names(storage):  # interrupted before its study was written
            continue
        study = optuna.load_study(study_name=pair, storage=storage)
        for trial in own_trials(study, (TrialState.COMPLETE, TrialState.PRUNED)):
            trial_id = trial.user_attrs.get(TRIAL_TAG, "")
            folder = run_dir.trial(pair, trial_id)
            if trial_id and SeedGroup(folder).exists():
                candidates.append(candidate_from_folder(folder, pair, trial_id))
    return candidates


def experiment_candidates(uri: str, experiment: str, download_to: Path) -> list[Candidate]:
    """The finished trial runs of MLflow experiment `experiment`, their checkpoints downloaded."""
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
        if not SeedGroup(target).exists():
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
    return loss_of(candidate.selection_metric, candidate.valid_score), candidate.name


class DatasetCache:
    """Datasets read for recomputing predictions, each once, checked against the fingerprint
    the trial recorded."""

    def __init__(self, loaded: list[FeatureSet] = ()) -> None:
        """`loaded`: datasets already in memory (a sweep's, in `msa run`)."""
        self._loaded = {(dataset.source, dataset.name): dataset for dataset in loaded}

    def get(self, path: str, name: str, fingerprint: str | None, *, member: str) -> FeatureSet:
        """The dataset `name` read from `path` (the name the trial recorded)."""
        if (path, name) not in self._loaded:
            if not Path(path).exists():
                raise MsaError(f"member {member}: its dataset {path} is gone; cannot recompute its predictions")
            self._loaded[path, name] = load_dataset(path, name=name)
        dataset = self._loaded[path, name]
        if fingerprint and dataset.fingerprint != fingerprint:
            raise MsaError(f"member {member}: dataset {path} changed since training (SHA-256 {dataset.fingerprint[:12]}... "
                           f"!= recorded {fingerprint[:12]}...)")
        return dataset


def load_member(candidate: Candidate, datasets: DatasetCache) -> Member:
    """Verify `candidate`'s weights and read (or recompute) its valid and test predictions; a
    seed group's are its seeds' mean.

    Raises:
        MsaError: missing weights, a SHA-256 mismatch, or unreadable predictions.
    """
    if len(candidate.folders) > 1:
        seeds = [load_member(seed, datasets) for seed in candidate.seed_candidates()]
        member = Member(candidate=candidate, task=seeds[0].task, recomputed=any(s.recomputed for s in seeds), seeds=seeds)
        for split in ENSEMBLE_SPLITS:
            matrix = prediction_matrix(seeds, split)
            member.ids[split], member.labels[split] = matrix.ids, matrix.labels
            member.predictions[split] = matrix.predictions.mean(axis=1)
        return member
    checkpoint = Checkpoint(candidate.folder)
    checkpoint.verified_weights(f"member {candidate.name}")
    member = Member(candidate=candidate, task=checkpoint.spec.task)
    missing = [s for s in ENSEMBLE_SPLITS if not checkpoint.has_predictions(s)]
    for split in ENSEMBLE_SPLITS:
        if split not in missing:
            stored = checkpoint.predictions(split)
            member.ids[split], member.labels[split], member.predictions[split] = stored.ids, stored.labels, stored.values
    if missing:
        _recompute(member, checkpoint, missing, datasets)
    return member


def _recompute(member: Member, stored: Checkpoint, splits: list[str], datasets: DatasetCache) -> None:
    dataset = datasets.get(stored.config["data"], stored.metrics["dataset"], stored.metrics.get("dataset_fingerprint"),
                           member=member.name)
    checkpoint = LoadedCheckpoint(member.candidate.folder)
    for split in splits:
        part = dataset.splits[split]
        member.ids[split] = tuple(str(i) for i in part.ids)
        member.labels[split] = np.asarray(part.labels)
        member.predictions[split] = checkpoint.predict(checkpoint.inputs_of(part))
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
