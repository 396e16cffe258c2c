"""`msa sweep`: one Optuna study per (model, dataset) pair, run by Ray Tune over Ray Train trials.

For each pair a `ray.tune.Tuner` drives `OptunaSearch` (TPE or random, seeded, persisted in
SQLite inside the run directory) and ASHA. Each trial is a Tune function that runs a Ray Train
`TorchTrainer` of `workers_per_trial` workers, every worker running `train_loop` under DeepSpeed
(gloo on CPU). A one-worker trial runs the same `train_loop` inside the Tune function on a
one-rank process group instead (`resources.inline_single_worker`), which saves starting a Train
controller and a worker process per trial. Datasets are loaded once by the driver and shared
through the object store. Every epoch the trial saves its resumable state and reports it as its
checkpoint, so a retried trial (`FailureConfig`) and a resumed sweep (`Tuner.restore`) continue
where they were. Everything is tracked in MLflow (`tracking.py`), and each study's best trial is
registered (`model_registry.py`).

Run directory layout (``<storage>/<name>-<UTC time>/``):

    sweep.yaml            the validated config the sweep started with (resume compares against it)
    data/                 built-in datasets, generated once
    optuna/<pair>.db      one Optuna study per pair (open with optuna-dashboard)
    ray/<pair>/           Tune's experiment state (what `--resume` restores)
    trials/<pair>/<trial_id>/   each trial's best-epoch checkpoint folder (see train.py)
    mlflow/               the sweep's own MLflow store (SQLite + artifacts) when no tracking.uri is set
    summary.csv, summary.json   per pair: trials complete/pruned/failed, best valid metric and config
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState
from ray import tune
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.utils.util import unflatten_dict

from msa.platform.cluster import TRIAL_SLOT, check_address_format, check_shared_storage, check_trial_fits, connect, node_kinds, require_run_dir, trial_shape
from msa.platform.config import to_plain
from msa.platform.errors import MsaError
from msa.platform.features import FeatureSet
from msa.platform.metrics import METRIC_MODES, SUITE_METRICS
from msa.platform.mlflow_server import check_tracking_uri
from msa.platform.readers import load_dataset, sha256_path, write_mmsa_pickle
from msa.platform.search_space import load_search_space
from msa.platform.sweep_config import BUILTIN_DATASETS, SweepConfig, load_sweep_config, validate_sweep_config
from msa.platform.tracking import SweepTracking, TrialRunCloser, TrialTracking, failure_reason, open_trial_run
from msa.platform.train import resolve_config, train_loop

class SweepInterrupted(MsaError):
    """The user stopped the sweep; its state is saved and `msa sweep --resume` continues it."""

    exit_code = 130


@dataclass(frozen=True)
class PairContext:
    """What every trial of one (model, dataset) pair needs; shipped once via `tune.with_parameters`."""

    dataset_ref: list  # [ObjectRef]: a list so Ray hands the reference over, not the value
    run_dir: str
    trials_dir: str
    train_storage: str
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    worker_resources: dict[str, float]  # custom resources per worker
    placement: str  # Ray placement strategy of a trial's workers
    max_failures: int
    inline: bool  # run train_loop in the Tune function itself (one worker, see module docstring)
    study_storage: str  # the pair's Optuna study (SQLite URL); its name is the pair's
    tune_metric: str  # best_valid_<metric>, what Tune and the searcher read
    resuming: bool  # a resumed sweep: Tune's restored state may lag the study (see `_finished_in_study`)
    tracking: TrialTracking  # where the trial's MLflow run lives


def _train_and_report(train_config: dict[str, Any], dataset_ref: list, report_api, tracking_uri: str, run_id: str) -> None:
    """Train, logging every epoch to the trial's MLflow run (rank 0) and reporting it with a
    resumable checkpoint; continue from the last one.

    `report_api` is `ray.train` on a Train worker and `ray.tune` in an inline trial: both have
    `report`, `get_checkpoint` and `Checkpoint`."""
    import ray
    import torch.distributed

    from msa.platform.tracking import EpochLogger

    for storage_logger in ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage"):
        # Both log one INFO line per saved checkpoint, i.e. per epoch of every trial.
        logging.getLogger(storage_logger).setLevel(logging.WARNING)
    dataset = ray.get(dataset_ref[0])
    loggers: list[EpochLogger] = []  # rank 0's, made at its first epoch (the process group exists by then)

    def report(record: dict[str, float], save_state) -> None:
        # Logged before reporting: the scheduler may stop the trial once it sees this epoch.
        if torch.distributed.get_rank() == 0:
            if not loggers:
                loggers.append(EpochLogger(tracking_uri, run_id))
            loggers[0](record)
        with tempfile.TemporaryDirectory() as folder:
            save_state(Path(folder))
            report_api.report(record, checkpoint=report_api.Checkpoint.from_directory(folder))

    checkpoint = report_api.get_checkpoint()
    if checkpoint is None:
        # An attempt stopped between writing its first best epoch and reporting a checkpoint
        # (Ctrl-C, a crash) leaves the trial's folder behind; this attempt starts over.
        train_loop(train_config, dataset=dataset, on_epoch=report, replace_stale_out=True)
    else:
        with checkpoint.as_directory() as folder:
            train_loop(train_config, dataset=dataset, on_epoch=report, resume_from=Path(folder))


def worker_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train

    _train_and_report(loop_config["train"], loop_config["dataset_ref"], ray.train, loop_config["tracking_uri"],
                      loop_config["run_id"])


def run_trial(config: dict[str, Any], context: PairContext) -> None:
    """The Tune function trainable: inline for one worker, else one data-parallel TorchTrainer."""
    require_run_dir(Path(context.run_dir))
    trial_id = tune.get_context().get_trial_id()
    finished = _finished_in_study(context, trial_id) if context.resuming else None
    if finished is not None:  # finished after a killed driver last saved Tune's state: not trained again
        tune.report({"epoch": max(finished.intermediate_values, default=0), context.tune_metric: finished.value,
                     "final": float(finished.state == TrialState.COMPLETE)})
        return
    train_config = {**config, "out": str(Path(context.trials_dir) / trial_id)}
    run_id = open_trial_run(context.tracking, trial_id, train_config)
    if context.inline:
        _train_and_report(train_config, context.dataset_ref, tune, context.tracking.uri, run_id)
        return
    # Imported here: an inline trial never needs Ray Train's controller machinery.
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    use_gpu = context.gpus_per_worker > 0
    worker_resources = {"CPU": context.cpus_per_worker, **({"GPU": context.gpus_per_worker} if use_gpu else {}),
                        **context.worker_resources}
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"train": train_config, "dataset_ref": context.dataset_ref,
                           "tracking_uri": context.tracking.uri, "run_id": run_id},
        scaling_config=ScalingConfig(num_workers=context.workers, use_gpu=use_gpu, resources_per_worker=worker_resources,
                                     placement_strategy=context.placement),
        run_config=RunConfig(
            name=trial_id,  # stable per trial, so a retried or restored trial finds its checkpoint
            storage_path=context.train_storage,
            callbacks=[TuneReportCallback()],
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=context.max_failures),
        ),
    )
    trainer.fit()


def _finished_in_study(context: PairContext, trial_id: str) -> optuna.trial.FrozenTrial | None:
    """The study's record of this trial if it already finished (COMPLETE or PRUNED): it did so
    after a killed driver last saved Tune's state, so Tune restored it as unfinished."""
    study = optuna.load_study(study_name=Path(context.trials_dir).name, storage=context.study_storage)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return next((t for t in done if t.user_attrs.get("ray_trial_id") == trial_id), None)


def trial_dirname(trial) -> str:
    """Tune's folder for a trial: its id, as in `trials/` (Tune's default spells out every param)."""
    return trial.trial_id


class PruningAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that records scheduler-stopped trials as PRUNED and errored ones as FAIL.

    Ray's OptunaSearch tells Optuna COMPLETE whenever the last result has the metric, so an
    ASHA-stopped trial would enter the study as finished with a truncated score. A trial's
    natural last epoch carries ``final = 1``; any other ending was the scheduler's. A failed
    trial keeps Ray's reason as its ``fail_reason`` user attribute (`errors_dir`: Tune's
    experiment folder, where each trial's ``error.txt`` is written before the searcher hears).
    """

    def __init__(self, *args, errors_dir: str, budget: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.errors_dir, self.budget = errors_dir, budget

    def suggest(self, trial_id: str) -> dict | str | None:
        orphan = self._orphan()
        if orphan is not None:  # the budget's trial that a killed driver asked for: run it now
            self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, orphan._trial_id)
            self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
            return unflatten_dict(orphan.params)
        if len(self._ot_study.get_trials(deepcopy=False)) >= self.budget:
            return Searcher.FINISHED  # the study holds the budget, some trials finished unknown to Tune's state
        suggestion = super().suggest(trial_id)
        if trial_id in self._ot_trials:  # link the study's record to the Ray trial and its folder
            self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
        return suggestion

    def _orphan(self) -> optuna.trial.FrozenTrial | None:
        """A RUNNING study trial that no trial of this Tune run owns.

        Tune saves its experiment state every few seconds, Optuna commits at once: a driver
        killed in between (SIGKILL, a lost head node) leaves the study a trial that the restored
        Tune run never heard of. It is handed to the next new Tune trial instead of asking
        Optuna for one more; and a trial that finished in that gap still counts: `suggest`
        stops at the study's size, not Tune's count, so the study ends with exactly the budget."""
        owned = {ot_trial._trial_id for ot_trial in self._ot_trials.values()}
        running = self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return next((t for t in running if t._trial_id not in owned), None)

    def _already_finished(self, trial_id: str) -> bool:
        """Finished before a killed driver's last saved state knew it; Tune restored it as
        unfinished and `run_trial` only reports the study's result again."""
        ot_trial = self._ot_trials.get(trial_id)
        return ot_trial is not None and self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not self._already_finished(trial_id):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        ot_trial = self._ot_trials[trial_id]
        if self._already_finished(trial_id):
            self._completed_trials.add(trial_id)
            return None
        if error:
            state = TrialState.FAIL
            ot_trial.set_user_attr("fail_reason", failure_reason(self._error_file(trial_id)))
        elif result is None or not result.get("final"):
            state = TrialState.PRUNED
            # Tune hands the result that made the scheduler stop the trial only to this
            # method; keep it as the last intermediate value (Optuna's value for a PRUNED trial).
            if result is not None and self.metric in result:
                with warnings.catch_warnings():  # Optuna ignores (and warns about) a step already reported
                    warnings.simplefilter("ignore")
                    ot_trial.report(result[self.metric], result[TRAINING_ITERATION])
        else:
            return super().on_trial_complete(trial_id, result, error)
        self._ot_study.tell(ot_trial, state=state)
        self._completed_trials.add(trial_id)

    def _error_file(self, trial_id: str) -> Path | None:
        """The trial's ``error.txt``: Tune writes it in the driver's staging folder for this fit
        (``<session>/artifacts/<fit time>/<experiment>/driver_artifacts/<trial>``) and copies it
        to the experiment folder later; the newest copy is the latest failure's."""
        from ray.train.constants import _get_ray_train_session_dir

        experiment = Path(self.errors_dir)
        staged = Path(_get_ray_train_session_dir()).glob(f"*/{experiment.name}/driver_artifacts/{trial_id}/error.txt")
        found = [path for path in (*staged, experiment / trial_id / "error.txt") if path.is_file()]
        return max(found, key=lambda path: path.stat().st_mtime, default=None)

class PairProgress(tune.Callback):
    """Prints, per pair, trials done out of the budget and the best valid metric so far."""

    def __init__(self, pair: str, total: int, metric: str, mode: str):
        self.pair, self.total, self.metric, self.mode = pair, total, metric, mode
        self.done, self.best = 0, None

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._count(trial, "complete" if (trial.last_result or {}).get("final") else "stopped early")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._count(trial, "failed")

    def _count(self, trial, how: str) -> None:
        self.done += 1
        value = (trial.last_result or {}).get(self.metric)
        if value is not None and not math.isnan(value):
            if self.best is None or (value < self.best if self.mode == "min" else value > self.best):
                self.best = value
        best = "-" if self.best is None else f"{self.best:.4g}"
        print(f"[{self.pair}] {self.done}/{self.total} trials finished ({trial.trial_id} {how}); "
              f"best valid {self.metric.removeprefix('best_valid_')} so far: {best}", flush=True)


def _make_run_dir(config: SweepConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run_dir = Path(config.storage).resolve() / f"{config.name}-{stamp}"
    if run_dir.exists():
        raise MsaError(f"run directory {run_dir} already exists; wait a second or change name")
    run_dir.mkdir(parents=True)
    (run_dir / "sweep.yaml").write_text(yaml.safe_dump(to_plain(config), sort_keys=False))
    return run_dir


def _load_datasets(config: SweepConfig, run_dir: Path | None) -> dict[str, FeatureSet]:
    """Every dataset, loaded once. Built-ins are generated (or, on resume, re-read from the run
    directory); paths are read as given."""
    from msa.platform.synth import synthesize

    datasets = {}
    for name in config.datasets:
        if name not in BUILTIN_DATASETS:
            datasets[name] = load_dataset(Path(name).resolve())
        elif run_dir is not None and (run_dir / "data" / f"{name}.pkl").is_file():
            datasets[name] = load_dataset(run_dir / "data" / f"{name}.pkl")
        else:
            datasets[name] = synthesize(name.removeprefix("synth_"), seed=0)
    return datasets


def _save_builtin_datasets(datasets: dict[str, FeatureSet], run_dir: Path) -> None:
    """Write generated datasets into the run directory, so trials and resumes read one file."""
    for name, dataset in datasets.items():
        path = run_dir / "data" / f"{name}.pkl"
        if name in BUILTIN_DATASETS and not path.exists():
            write_mmsa_pickle(dataset, path)
            dataset.source = str(path)


def run_sweep(config: SweepConfig, *, resume_dir: Path | None = None, address: str | None = None) -> list[dict[str, Any]]:
    """Run (or resume) a sweep; returns the summary rows, also written to the run directory.

    Raises:
        MsaError: invalid config, data or metric, or resources no node could ever give.
    """
    import ray

    datasets = _load_datasets(config, resume_dir)
    for name, dataset in datasets.items():
        metric = config.selection_metric(dataset.metric_suite)
        if metric not in SUITE_METRICS[dataset.metric_suite]:
            raise MsaError(
                f"unknown metric {metric!r} for dataset {name!r} ({dataset.metric_suite} metrics: "
                f"{', '.join(SUITE_METRICS[dataset.metric_suite])})"
            )
    spaces = {model: load_search_space(model, config.search.spaces.get(model)) for model in config.models}
    if config.tracking.uri:  # before anything is written: an unreachable server is an input error
        check_tracking_uri(config.tracking.uri)
    if address:
        check_address_format(address)
    if address and ray.is_initialized():  # joining would otherwise be skipped silently
        raise MsaError(f"cannot join the Ray cluster at {address!r}: this process already runs Ray; "
                       f"start the sweep from a fresh process")
    storage = Path(config.storage).resolve()
    new_folders = [folder for folder in (storage, *storage.parents) if not folder.exists()]  # deepest first
    run_dir = resume_dir if resume_dir is not None else _make_run_dir(config)
    tracking = None
    own_runtime = not ray.is_initialized()  # tests and notebooks may already hold one
    trials_queued = False  # until then, a new sweep that is refused leaves no run directory behind
    try:
        _save_builtin_datasets(datasets, run_dir)
        for dataset in datasets.values():  # once here, not in every trial's checkpoint writer
            dataset.fingerprint = sha256_path(dataset.source)
        tracking = SweepTracking(config.tracking.uri, run_dir, to_plain(config))  # its server boots while Ray starts
        joined = connect(address, config.resources.max_concurrent_trials) if own_runtime else None
        kinds = node_kinds(joined is not None)
        check_trial_fits(trial_shape(config.resources), kinds)
        if joined is not None:
            checked_from = time.monotonic()
            alive = sum(kind.name.startswith("node ") for kind in kinds)
            check_shared_storage(run_dir, config.tracking.uri, client=joined.startswith("ray://"), can_grow=len(kinds) > alive)
            print(f"[cluster] joined {joined}: {alive} nodes alive, {len(kinds) - alive} node types the autoscaler may add; "
                  f"every node sees {run_dir} and reaches MLflow (checked in {time.monotonic() - checked_from:.1f} s)",
                  flush=True)
        refs = {name: ray.put(dataset) for name, dataset in datasets.items()}
        trials_queued = True
        with tracking:
            rows = [
                _run_pair(config, run_dir, model, name, datasets[name], refs[name], spaces[model], resume_dir is not None,
                          tracking)
                for model in config.models
                for name in config.datasets
            ]
    finally:
        if tracking is not None:
            tracking.stop_server()
        if own_runtime:
            ray.shutdown()
        if resume_dir is None and not trials_queued:
            shutil.rmtree(run_dir, ignore_errors=True)
            for folder in new_folders:  # the storage folders this sweep created, if still empty
                with contextlib.suppress(OSError):
                    folder.rmdir()
    _write_summary(run_dir, rows)
    return rows


def _run_pair(config, run_dir, model, dataset_name, dataset: FeatureSet, ref, space, resuming: bool,
              tracking: SweepTracking) -> dict[str, Any]:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    pair = f"{model}-{Path(dataset_name).stem}"
    metric = config.selection_metric(dataset.metric_suite)
    mode = METRIC_MODES[metric]
    tune_metric = f"best_valid_{metric}"
    (run_dir / "optuna").mkdir(exist_ok=True)
    storage_url = f"sqlite:///{run_dir / 'optuna' / f'{pair}.db'}"
    context = PairContext(
        dataset_ref=[ref], run_dir=str(run_dir), trials_dir=str(run_dir / "trials" / pair),
        train_storage=str(run_dir / "train" / pair),
        workers=config.resources.workers_per_trial, cpus_per_worker=config.resources.cpus_per_worker,
        gpus_per_worker=config.resources.gpus_per_worker, worker_resources=dict(config.resources.worker_resources),
        placement=config.resources.placement, max_failures=config.resources.max_failures,
        inline=config.resources.workers_per_trial == 1 and config.resources.inline_single_worker,
        study_storage=storage_url, tune_metric=tune_metric, resuming=resuming,
        tracking=tracking.open_study(pair, model, dataset),
    )
    # An inline trial trains in the Tune function's own process, so that process holds the
    # worker's CPUs and GPUs; otherwise the Train workers hold them and the function holds none.
    trial_resources = (
        {"CPU": context.cpus_per_worker, "GPU": context.gpus_per_worker, **context.worker_resources}
        if context.inline else {"CPU": 0}
    )
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), {**trial_resources, TRIAL_SLOT: 1})
    experiment = run_dir / "ray" / pair
    callbacks = [PairProgress(pair, config.budget.trials_per_pair, tune_metric, mode),
                 TrialRunCloser(context.tracking, Path(context.trials_dir))]
    if resuming and tune.Tuner.can_restore(str(experiment)):
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=True)
        # The saved run config holds the callbacks pickled at the first start, whose tracking
        # server address is stale now: give the restored run this start's closer (Ray 2.60's
        # Tuner.restore takes no callbacks, so the restored run config is edited in place).
        run_config = tuner._local_tuner.get_run_config()
        run_config.callbacks = [c for c in run_config.callbacks if not isinstance(c, TrialRunCloser)] + [callbacks[1]]
    else:
        sampler_class = optuna.samplers.TPESampler if config.search.sampler == "tpe" else optuna.samplers.RandomSampler
        searcher = PruningAwareOptunaSearch(
            space=space.optuna_space(), metric=tune_metric, mode=mode, sampler=sampler_class(seed=config.search.seed),
            study_name=pair, storage=optuna.storages.RDBStorage(storage_url), errors_dir=str(experiment),
            budget=config.budget.trials_per_pair,
        )
        scheduler = (
            ASHAScheduler(time_attr="epoch", max_t=config.budget.max_epochs, grace_period=config.search.grace_period,
                          reduction_factor=config.search.reduction_factor)
            if config.search.scheduler == "asha" else FIFOScheduler()
        )
        param_space = {
            **config.train, **space.fixed_values(), "model": model, "data": dataset.source, "epochs": config.budget.max_epochs,
            "seed": config.search.seed, "selection_metric": metric,
            "zero_stage": config.deepspeed.zero_stage, "precision": config.deepspeed.precision,
        }
        resolve_config({**param_space, "out": "unused"}, where=f"{pair} trial config")  # fail before Ray works
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                search_alg=ConcurrencyLimiter(searcher, max_concurrent=config.resources.max_concurrent_trials),
                scheduler=scheduler, metric=tune_metric, mode=mode, num_samples=config.budget.trials_per_pair,
                time_budget_s=config.budget.time_budget_s, trial_dirname_creator=trial_dirname,
                # An inline trial's process keeps torch, DeepSpeed and its one-rank process group
                # for the next trial (Tune starts a fresh one after a failure).
                reuse_actors=context.inline,
            ),
            run_config=tune.RunConfig(
                name=pair, storage_path=str(run_dir / "ray"),
                failure_config=tune.FailureConfig(max_failures=config.resources.max_failures),
                callbacks=callbacks, verbose=1,
            ),
        )
    print(f"[{pair}] study {storage_url} ({config.budget.trials_per_pair} trials, metric valid {metric}, {mode})", flush=True)
    started = time.monotonic()
    tuner.fit()
    study = optuna.load_study(study_name=pair, storage=storage_url)
    row = {**_pair_summary(pair, model, dataset_name, metric, mode, study, Path(context.trials_dir)), "run_dir": str(run_dir)}
    # Tune returns normally on Ctrl-C, and the trials it stops then never reach the searcher:
    # fewer finished trials in the study than the budget, with time left, means the user stopped it.
    out_of_time = config.budget.time_budget_s is not None and time.monotonic() - started >= config.budget.time_budget_s
    if row["complete"] + row["pruned"] + row["failed"] < config.budget.trials_per_pair and not out_of_time:
        raise SweepInterrupted(f"sweep interrupted during {pair}; resume with: msa sweep --resume {run_dir}")
    tracking.close_study(context.tracking, study, row)
    return row


def _pair_summary(pair, model, dataset_name, metric, mode, study, trials_dir: Path) -> dict[str, Any]:
    """Counts and the best trial, read back from the Optuna study (the record of what happened)."""
    trials = study.get_trials(deepcopy=False)
    counts = {state: sum(t.state == state for t in trials) for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    # A PRUNED trial's value is its last (best-so-far) intermediate value, so it competes too.
    scored = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.value is not None]
    best = (min if mode == "min" else max)(scored, key=lambda t: t.value) if scored else None
    row: dict[str, Any] = {
        "pair": pair, "model": model, "dataset": dataset_name, "metric": f"valid_{metric}", "mode": mode,
        "trials": len(trials), "complete": counts[TrialState.COMPLETE], "pruned": counts[TrialState.PRUNED],
        "failed": counts[TrialState.FAIL], "best_value": None, "best_params": None, "best_checkpoint": None,
    }
    if best is not None:
        folder = trials_dir / best.user_attrs.get("ray_trial_id", "")
        row.update(best_value=best.value, best_params=best.params,
                   best_checkpoint=str(folder) if (folder / "metrics.json").is_file() else None)
    return row


SUMMARY_COLUMNS = ("pair", "trials", "complete", "pruned", "failed", "metric", "best_value", "best_checkpoint")


def _write_summary(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    (run_dir / "summary.json").write_text(json.dumps(rows, indent=2, default=str))
    with (run_dir / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*SUMMARY_COLUMNS, "best_params"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "best_params": json.dumps(r["best_params"])} for r in rows)


def format_summary(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'pair':<34}{'trials':>7}{'done':>6}{'pruned':>8}{'failed':>8}  {'best valid':<22}best config"]
    for r in rows:
        best = "-" if r["best_value"] is None else f"{r['metric'][6:]} {r['best_value']:.4g}"
        lines.append(f"{r['pair']:<34}{r['trials']:>7}{r['complete']:>6}{r['pruned']:>8}{r['failed']:>8}  "
                     f"{best:<22}{json.dumps(r['best_params'])}")
    return "\n".join(lines)


def resume_config(run_dir: Path, config_path: str | None, overrides: list[str]) -> SweepConfig:
    """The config a run started with; a given config must match it exactly."""
    started_file = run_dir / "sweep.yaml"
    if not run_dir.is_dir() or not started_file.is_file():
        raise MsaError(f"{run_dir} is not a sweep run directory (no sweep.yaml); cannot resume it")
    from msa.platform.config import build_dataclass, load_yaml_mapping

    started = validate_sweep_config(
        build_dataclass(SweepConfig, load_yaml_mapping(started_file), where=str(started_file)), where=str(started_file)
    )
    if config_path is not None or overrides:
        if config_path is not None:
            given = load_sweep_config(config_path, overrides)
        else:
            from msa.platform.config import merge, parse_overrides

            where = f"{started_file} + command-line overrides"
            given = validate_sweep_config(
                build_dataclass(SweepConfig, merge(to_plain(started), parse_overrides(overrides)), where=where), where=where
            )
        if to_plain(given) != to_plain(started):
            diff = _first_difference(to_plain(started), to_plain(given))
            raise MsaError(f"the config differs from the one {run_dir} started with ({diff}); resume without changes")
    return started


def _first_difference(a: dict, b: dict, prefix: str = "") -> str:
    for key in sorted(set(a) | set(b)):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            found = _first_difference(a[key], b[key], f"{prefix}{key}.")
            if found:
                return found
        elif a.get(key) != b.get(key):
            return f"{prefix}{key}: started with {a.get(key)!r}, given {b.get(key)!r}"
    return ""
