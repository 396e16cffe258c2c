"""`msa ensemble`: stacked ensembles from a sweep's best checkpoints, and their leaderboard.

Per dataset:

1. Members: the best ``top_k`` trials of each model by the valid selection metric, weights
   verified against their SHA-256, valid/test predictions aligned by clip id (`members.py`). A
   trial of several seeds (a seed group) is one member: ranked on its seed mean, predicting its
   seeds' mean, shown as mean ± sd over its seeds.
2. Baselines: every member, the best single model (best valid score of all members), and the
   seed ensemble (the best single model's own seeds and its config retrained with ``seeds - 1``
   more seeds, averaged; `retrain.py`).
3. Meta-learners (`meta_learners.py`), fitted under the configured protocol (`protocol.py`):
   ``crossfit`` fits on the members' valid predictions and reports a valid score cross-fitted
   over folds grouped by video; ``oof`` retrains each member's config on K grouped folds of
   train+valid, stacks on the out-of-fold predictions, and reports the cross-fitted score on the
   valid clips. Test is scored once, after every learner is fitted.
4. Leaderboard: every row's test metrics, the valid selection metric, the paired bootstrap 95%
   interval of its test difference against the best single model, members and weights, fit and
   predict time, MLflow run and registry version (`leaderboard.py` renders it).
5. MLflow: one ``ensembles`` run in the sweep's experiment (the leaderboard files as artifacts)
   with a child run per dataset (every row's metrics, the combiners); the best ensemble by valid
   score is registered as ``msa-ensemble-<dataset>`` (``champion`` or ``challenger``, see `msa.platform.tracking.aliases`).

Outputs (``<run dir>/ensembles/`` or ``--out``): leaderboard.json/.csv/.md/.html, and per dataset
``<dataset>/combiners.json``, ``<dataset>/seeds/`` and ``<dataset>/oof/`` (retrained checkpoints).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msa.ensembles.board import BoardRow, DatasetBoard, Interval, Leaderboard, SeedSpread
from msa.ensembles.board import Member as BoardMember
from msa.ensembles.config import EnsembleConfig, validate_ensemble_config
from msa.ensembles.folds import grouped_folds
from msa.ensembles.leaderboard import write_all
from msa.ensembles.matrix import PredictionMatrix
from msa.ensembles.members import (
    Candidate,
    DatasetCache,
    Member,
    experiment_candidates,
    load_member,
    prediction_matrix,
    select_top_k,
    sweep_candidates,
)
from msa.ensembles.meta_learners import learners_for, make_meta_learner
from msa.ensembles.protocol import PairedBootstrap, finite_metrics, fit_ensemble, score_test
from msa.ensembles.registration import register_ensemble
from msa.ensembles.retrain import out_of_fold_members, pool_folds, seed_members, training_config
from msa.platform.core.config import load_yaml_mapping, to_plain
from msa.platform.core.errors import MsaError
from msa.platform.core.metrics import SUITE_METRICS, compute_metrics, direction, loss_of
from msa.platform.core.run_dir import RunDir
from msa.platform.tracking.client import (
    ROLE_TAG,
    TRIAL_TAG,
    client,
    environment_tags,
    experiment_id,
    find_runs,
    flatten,
    log_metrics,
    log_params,
)
from msa.platform.tracking.server import require_store, serving
from msa.platform.training.checkpoint import Checkpoint

ROLE = "ensembles"


@dataclass
class Row:
    """One leaderboard row before export: its predictions and where it came from."""

    name: str
    kind: str  # member | best single | seed ensemble | ensemble
    stack_level: int
    valid_prediction: np.ndarray
    test_prediction: np.ndarray
    valid_estimate: str
    members: list[tuple[str, float]]
    groups: list[list[Path]]  # checkpoint folders per member column (for registration)
    combiner: dict | None
    fit_seconds: float | None
    predict_seconds: float | None
    mlflow_run_id: str = ""
    registered: str = ""
    seed_scores: list[dict[str, dict]] | None = None  # a seed group's: each seed's valid and test metrics


def build_ensembles(options: EnsembleConfig, *, run_dir: Path | None = None, experiment: str | None = None,
                    tracking_uri: str | None = None, out_dir: Path | None = None, datasets: DatasetCache | None = None,
                    export: Path | None = None) -> Leaderboard:
    """Build every dataset's ensembles and leaderboard; returns the leaderboard.

    Members come from `run_dir` (a sweep run directory) or from MLflow `experiment` at
    `tracking_uri`. Tracking goes to `tracking_uri`, else the sweep's configured server, else the
    run directory's own store (served while this runs). `datasets` holds datasets already loaded
    and hashed (`msa run` passes the sweep's); the leaderboard files are written to `out_dir`
    (default ``<run dir>/ensembles``) and, when given, `export`.

    Raises:
        MsaError: bad options; no finished trials; top_k above a model's finished trials; a
            checkpoint whose SHA-256 does not match; members predicting different clips; an
            unreachable tracking server.
    """
    options = validate_ensemble_config(options, where="ensemble options")
    if run_dir is None and (experiment is None or not tracking_uri or out_dir is None):
        raise MsaError("give a sweep run directory, or --experiment with --tracking-uri and --out")
    if run_dir is not None and not RunDir(run_dir).is_sweep():
        raise MsaError(f"{run_dir} is not a sweep run directory (no sweep.yaml)")
    out_dir = Path(out_dir) if out_dir is not None else RunDir(run_dir).ensembles_dir
    datasets = datasets if datasets is not None else DatasetCache()
    configured = tracking_uri or (_sweep_tracking_uri(run_dir) if run_dir is not None else "")
    if run_dir is not None:
        chosen = select_top_k(sweep_candidates(run_dir), options.top_k)
        members = _load_members(chosen, datasets)  # every input check before a server starts
        if not configured:
            require_store(run_dir)
    with serving(configured, run_dir) as uri:
        if run_dir is None:
            chosen = select_top_k(experiment_candidates(uri, experiment, out_dir / "checkpoints"), options.top_k)
            members = _load_members(chosen, datasets)
        mlflow_client = client(uri)
        experiment_name = experiment or run_dir.name
        experiment_number = experiment_id(mlflow_client, experiment_name)
        entries = [_build_dataset(name, members[name], options, out_dir / name, datasets) for name in sorted(members)]
        board = Leaderboard(
            run_dir=str(run_dir) if run_dir is not None else f"{uri} experiment {experiment_name}",
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            protocol=options.protocol, folds=options.folds, bootstrap=options.bootstrap,
            datasets=[entry for entry, _ in entries],
        )
        _track(mlflow_client, uri, experiment_number, options, board, entries, [out_dir, *([export] if export else [])])
    return board


def _load_members(chosen: dict[str, list[Candidate]], datasets: DatasetCache) -> dict[str, list[Member]]:
    loaded = {}
    for dataset, candidates in chosen.items():
        loaded[dataset] = [load_member(candidate, datasets) for candidate in candidates]
        for split in ("valid", "test"):
            prediction_matrix(loaded[dataset], split)  # id and label agreement, checked up front
    return loaded


def _sweep_tracking_uri(run_dir: Path) -> str:
    return str(load_yaml_mapping(RunDir(run_dir).config_file).get("tracking", {}).get("uri", "") or "")


def _build_dataset(name: str, members: list[Member], options: EnsembleConfig, folder: Path,
                   datasets: DatasetCache) -> tuple[DatasetBoard, list[Row]]:
    """One dataset's rows, ranked, as the leaderboard entry; the rows are returned for tracking."""
    best = members[0]  # members come ranked by valid score, across models
    config = training_config(best.candidate.folder)  # a seed group's first seed's
    dataset = datasets.get(config["data"], best.candidate.dataset, _fingerprint(best), member=best.name)
    suite, metric = dataset.metric_suite, best.candidate.selection_metric
    valid, test = prediction_matrix(members, "valid"), prediction_matrix(members, "test")
    rows = [_member_row(member, number, valid, test, best) for number, member in enumerate(members)]
    rows.append(_seed_row(seed_members(best, dataset, folder / "seeds", options.seeds, datasets), len(best.seeds or [best])))

    names = options.learners or learners_for(dataset.task)
    learners = {learner: make_meta_learner(learner, task=dataset.task, suite=suite, metric=metric,
                                           **({"steps": options.caruana_steps, "seed": options.seed}
                                              if learner == "caruana" else {}))
                for learner in names if learner in learners_for(dataset.task)}
    if not learners:
        raise MsaError(f"dataset {name}: none of the meta-learners {names} suits a {dataset.task} task "
                       f"(use {', '.join(learners_for(dataset.task))})")
    if options.protocol == "crossfit":
        fitted, groups, estimate = _crossfit(learners, members, valid, options)
        stack_test = test
    else:
        fitted, groups, estimate, stack_test = _out_of_fold(learners, members, dataset, valid, test, folder / "oof",
                                                            options, datasets)
    score_test(list(fitted.values()), stack_test)  # once, after every learner is fitted
    for learner_name, ensemble in fitted.items():
        weights = ensemble.learner.weights()
        rows.append(Row(name=learner_name, kind="ensemble", stack_level=1, valid_prediction=ensemble.valid_prediction,
                        test_prediction=ensemble.test_prediction, valid_estimate=estimate,
                        members=[(m, float(weights[m])) for m in stack_test.members], groups=groups,
                        combiner=ensemble.learner.combiner, fit_seconds=ensemble.fit_seconds,
                        predict_seconds=ensemble.predict_seconds))
    return _entry(name, dataset, metric, rows, valid, test, options), rows


def _fingerprint(member: Member) -> str | None:
    return Checkpoint(member.candidate.folders[0]).metrics.get("dataset_fingerprint")


def _member_row(member: Member, number: int, valid: PredictionMatrix, test: PredictionMatrix, best: Member) -> Row:
    return Row(name=member.name, kind="best single" if member is best else "member", stack_level=0,
               valid_prediction=valid.predictions[:, number], test_prediction=test.predictions[:, number],
               valid_estimate="selected epoch (early stopping on valid)", members=[(member.name, 1.0)],
               groups=[list(member.candidate.folders)], combiner={"kind": "weighted", "weights": [1.0], "intercept": 0.0},
               fit_seconds=_training_seconds(member), predict_seconds=None, mlflow_run_id=member.candidate.mlflow_run_id,
               seed_scores=[Checkpoint(folder).metrics for folder in member.candidate.folders]
               if len(member.candidate.folders) > 1 else None)


def _training_seconds(member: Member) -> float:
    """Seconds the member's training spent in its epochs (its history.csv; a seed group's, summed)."""
    return sum(Checkpoint(folder).epoch_seconds() for folder in member.candidate.folders)


def _seed_row(seeds: list[Member], own: int) -> Row:
    """The seed ensemble: the best single model's `own` seeds and the retrained ones, averaged."""
    valid, test = prediction_matrix(seeds, "valid"), prediction_matrix(seeds, "test")
    return Row(name=f"seed ensemble ({len(seeds)} seeds)", kind="seed ensemble", stack_level=1,
               valid_prediction=valid.predictions.mean(axis=1), test_prediction=test.predictions.mean(axis=1),
               valid_estimate="average of seeds, each selected by early stopping on valid",
               members=[(m.name, 1.0 / len(seeds)) for m in seeds], groups=[[m.candidate.folder for m in seeds]],
               combiner={"kind": "weighted", "weights": [1.0], "intercept": 0.0},
               # the retrained seeds' training; the original's is on its own row
               fit_seconds=sum(_training_seconds(m) for m in seeds[own:]), predict_seconds=None)


def _crossfit(learners, members: list[Member], valid: PredictionMatrix, options: EnsembleConfig):
    folds = grouped_folds(valid.ids, options.folds, seed=options.seed)
    fitted = {name: fit_ensemble(learner, valid, folds) for name, learner in learners.items()}
    groups = [list(member.candidate.folders) for member in members]
    return fitted, groups, f"cross-fitted, {options.folds} folds of valid grouped by video"


def _out_of_fold(learners, members: list[Member], dataset, valid: PredictionMatrix, test: PredictionMatrix,
                 folder: Path, options: EnsembleConfig, datasets: DatasetCache):
    """Retrain every member on K grouped folds of train+valid and stack on the out-of-fold
    predictions; the ensembles' valid predictions are their cross-fitted ones on the valid clips,
    in `valid`'s row order, and the test matrix follows `test`'s."""
    pool, folds = pool_folds(dataset, options.folds, options.seed)
    pool_ids = tuple(str(i) for i in pool.ids)
    columns_oof, columns_test, groups = [], [], []
    for member in members:
        # A seed group's every seed is retrained on each fold; the fold's prediction is their mean.
        per_seed = [out_of_fold_members(seed.candidate, dataset, pool, folds,
                                        folder / seed.name.replace("/", "-"), datasets)
                    for seed in (member.seeds or [member])]
        oof = np.zeros((len(pool_ids),) + member.predictions["valid"].shape[1:])
        for fold_members in per_seed:
            for fold, fold_member in enumerate(fold_members):
                rows = np.flatnonzero(folds == fold)
                position = {clip: i for i, clip in enumerate(fold_member.ids["valid"])}
                oof[rows] += fold_member.predictions["valid"][[position[pool_ids[i]] for i in rows]] / len(per_seed)
        columns_oof.append(oof)
        fold_test = prediction_matrix([m for fold_members in per_seed for m in fold_members], "test")
        position = {clip: i for i, clip in enumerate(fold_test.ids)}
        columns_test.append(fold_test.predictions.mean(axis=1)[[position[clip] for clip in test.ids]])
        groups.append([m.candidate.folder for fold_members in per_seed for m in fold_members])
    stack = PredictionMatrix(split="oof", ids=pool_ids, labels=np.asarray(pool.labels), task=dataset.task,
                             predictions=np.stack(columns_oof, axis=1), members=test.members)
    stack_test = PredictionMatrix(split="test", ids=test.ids, labels=test.labels, task=dataset.task,
                                  predictions=np.stack(columns_test, axis=1), members=test.members)
    fitted = {name: fit_ensemble(learner, stack, folds) for name, learner in learners.items()}
    pool_index = {clip: i for i, clip in enumerate(pool_ids)}
    valid_rows = [pool_index[clip] for clip in valid.ids]
    for ensemble in fitted.values():
        ensemble.valid_prediction = ensemble.valid_prediction[valid_rows]
    estimate = (f"out-of-fold: members retrained on {options.folds} grouped folds of train+valid, "
                "stacker cross-fitted on those folds, scored on the valid clips")
    return fitted, groups, estimate, stack_test


def _entry(name: str, dataset, metric: str, rows: list[Row], valid: PredictionMatrix, test: PredictionMatrix,
           options: EnsembleConfig) -> DatasetBoard:
    """The leaderboard section of one dataset: rows ranked by the valid selection metric."""
    suite = dataset.metric_suite
    best = next(row for row in rows if row.kind == "best single")
    bootstrap = PairedBootstrap(suite, test.labels, best.test_prediction, resamples=options.bootstrap, seed=options.seed)
    scored = []
    for row in rows:
        valid_score = compute_metrics(suite, row.valid_prediction, valid.labels)[metric]
        if row.seed_scores:  # a seed group: ranked on its seed mean, as its trial was
            valid_score = _seed_stats(row.seed_scores, "valid")[metric][0]
        scored.append((row, valid_score))
    scored.sort(key=lambda pair: (loss_of(metric, pair[1]), pair[0].stack_level == 0))
    out_rows = []
    for row, valid_score in scored:
        test_scores = compute_metrics(suite, row.test_prediction, test.labels)
        seeds = None
        if row.seed_scores:  # mean +- sd over the seeds; Δ still compares predictions (the seed mean's)
            stats = {split: _seed_stats(row.seed_scores, split) for split in ("valid", "test")}
            test_scores = {m: value for m, (value, _) in stats["test"].items()}
            seeds = SeedSpread(count=len(row.seed_scores), valid_sd={metric: stats["valid"][metric][1]},
                               test_sd={m: sd for m, (_, sd) in stats["test"].items()})
        out_rows.append(BoardRow(
            name=row.name, kind=row.kind, stack_level=row.stack_level,
            valid=finite_metrics({metric: valid_score}), valid_estimate=row.valid_estimate,
            test=finite_metrics(test_scores),
            test_diff={m: Interval(**diff) for m, diff in bootstrap.compare(row.test_prediction).items()},
            members=[BoardMember(name=member, weight=weight) for member, weight in row.members],
            fit_seconds=row.fit_seconds, predict_seconds=row.predict_seconds,
            mlflow_run_id=row.mlflow_run_id, registered=row.registered, seeds=seeds,
        ))
    return DatasetBoard(dataset=name, metric_suite=suite, task=dataset.task, selection_metric=metric,
                        metrics=list(SUITE_METRICS[suite]), directions={m: direction(m) for m in SUITE_METRICS[suite]},
                        best_single=best.name, rows=out_rows)


def _seed_stats(seed_scores: list[dict[str, dict]], split: str) -> dict[str, tuple[float, float]]:
    """Per metric, the seeds' mean and sample standard deviation on `split` (NaN where a seed's is undefined)."""
    stats = {}
    for metric in seed_scores[0][split]:
        values = np.asarray([np.nan if s[split].get(metric) is None else s[split][metric] for s in seed_scores], float)
        stats[metric] = (float(values.mean()), float(values.std(ddof=1)))
    return stats


def _track(mlflow_client, uri: str, experiment_id: str, options: EnsembleConfig, board: Leaderboard,
           entries: list[tuple[DatasetBoard, list[Row]]], folders: list[Path]) -> None:
    """Runs, metrics, combiners, the registered best ensemble, then the leaderboard files (written
    and logged last, so they hold the run ids and registry versions) into each of `folders`; the
    first also receives the combiners."""
    out_dir = folders[0]
    tags = {**environment_tags(), ROLE_TAG: ROLE}
    parent = mlflow_client.create_run(experiment_id, run_name=ROLE, tags=tags).info.run_id
    status = "FAILED"
    try:
        log_params(mlflow_client, parent, flatten({**to_plain(options), "source": board.run_dir}))
        trial_runs = {(run.data.tags.get("model"), run.data.tags.get(TRIAL_TAG)): run.info.run_id
                      for run in find_runs(mlflow_client, experiment_id, {ROLE_TAG: "trial"}, max_results=10000)}
        for entry, rows in entries:
            dataset = entry.dataset
            child = mlflow_client.create_run(experiment_id, run_name=f"{ROLE}-{dataset}", tags={
                **tags, ROLE_TAG: "ensemble", "dataset": dataset, "mlflow.parentRunId": parent}).info.run_id
            by_name = {row.name: row for row in rows}
            for row in entry.rows:
                if row.kind in ("member", "best single"):
                    row.mlflow_run_id = row.mlflow_run_id or trial_runs.get(tuple(row.name.split("/", 1)), "")
                    row.registered = _registered_as(mlflow_client, row.mlflow_run_id)
                else:
                    row.mlflow_run_id = child
                key = _metric_key(row.name)
                log_metrics(mlflow_client, child, {
                    **{f"{key}.valid_{m}": v for m, v in row.valid.items()},
                    **{f"{key}.test_{m}": v for m, v in row.test.items()}})
            folder = out_dir / dataset
            folder.mkdir(parents=True, exist_ok=True)
            combiners = {row.name: {"combiner": row.combiner, "members": row.members,
                                    "groups": [[str(p) for p in group] for group in row.groups]}
                         for row in rows if row.stack_level == 1}
            (folder / "combiners.json").write_text(json.dumps(combiners, indent=2))
            mlflow_client.log_artifact(child, str(folder / "combiners.json"))
            if options.register:
                _register_best(uri, child, entry, by_name, board)
            mlflow_client.set_terminated(child, status="FINISHED")
        paths = write_all(board, *folders)[0]
        for path in paths.values():
            mlflow_client.log_artifact(parent, str(path), artifact_path="leaderboard")
        status = "FINISHED"
    finally:
        mlflow_client.set_terminated(parent, status=status)


def _metric_key(name: str) -> str:
    """A row name as an MLflow metric prefix (letters, digits, _ - . / and spaces only)."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name).strip()


def _registered_as(mlflow_client, run_id: str) -> str:
    if not run_id:
        return ""
    versions = mlflow_client.search_model_versions(f"run_id = '{run_id}'")
    return ", ".join(f"{v.name}@{v.version}" for v in sorted(versions, key=lambda v: (v.name, int(v.version))))


def _register_best(uri: str, run_id: str, entry: DatasetBoard, rows: dict[str, Row], board: Leaderboard) -> None:
    """Register the best stacked ensemble by its cross-fitted valid score as ``msa-ensemble-<dataset>``
    (the seed ensemble is the baseline it is measured against, not a candidate)."""
    best = next(row for row in entry.rows if row.kind == "ensemble")
    row = rows[best.name]
    metric = entry.selection_metric
    name = f"msa-ensemble-{entry.dataset}"
    fingerprint = Checkpoint(row.groups[0][0]).metrics.get("dataset_fingerprint") or ""
    registered = register_ensemble(uri, run_id, name, row.groups, row.combiner, entry.task, tags={
        "msa.run_id": run_id, "msa.sweep": Path(board.run_dir).name, "ensemble": best.name, "kind": best.kind,
        "protocol": board.protocol, "selection_metric": metric, "dataset_fingerprint": fingerprint,
        "members": ", ".join(f"{m}:{w:.4f}" for m, w in row.members),
        **{f"valid_{m}": str(v) for m, v in best.valid.items()},
        **{f"test_{m}": str(v) for m, v in best.test.items()},
    })
    best.registered = f"{name}@{registered.version}"
    print(f"[{entry.dataset}] registered {name} version {registered.version} ({registered.alias or 'no alias'}: "
          f"{registered.reason}): {best.name}", flush=True)
