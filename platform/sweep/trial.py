"""What runs inside a trial: the Tune function trainable (`run_trial`, in the Tune trial actor)
and, for a multi-worker trial, the Ray Train worker's loop (`worker_loop`, in each worker).

A one-worker trial runs `train_loop` inside the Tune function on a one-rank process group
(`resources.inline_single_worker`), which saves starting a Train controller and a worker process
per trial. Otherwise the function runs a `TorchTrainer` of `workers_per_trial` workers, each
running the same `train_seed_group` under DeepSpeed. A trial is one config trained with
``budget.seeds_per_trial`` seeds in lock-step (one seed: one model); what it reports each epoch is
the seed mean, and every seed's resumable state goes into the one checkpoint it reports, so a
retried trial (`FailureConfig`) and a resumed sweep (`Tuner.restore`) continue the whole group
where it was: a group is never half run, nor run twice.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
import ray.train
import torch.distributed
from optuna.trial import TrialState
from ray import tune
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from msa.platform.core.run_dir import RunDir
from msa.platform.sweep.cluster import TrialShape, require_run_dir
from msa.platform.sweep.schedule import PAIR_KEY
from msa.platform.sweep.text_inputs import DatasetInputs
from msa.platform.tracking.runs import EpochLogger, TrialTracking, open_trial_run
from msa.platform.training.config import TrainConfig, resolve_config
from msa.platform.training.loop import train_seed_group


@dataclass(frozen=True)
class PairContext:
    """What every trial of one (model, dataset) pair needs; every pair's is shipped once via
    `tune.with_parameters`."""

    inputs: DatasetInputs  # what its trials read: the dataset in the object store, text-cache entries
    run_dir: RunDir
    pair: str  # also the Optuna study's name
    shape: TrialShape
    max_failures: int
    tune_metric: str  # best_valid_<metric>, what Tune and the searcher read
    resuming: bool  # a resumed sweep: Tune's restored state may lag the study (see `_finished_in_study`)
    tracking: TrialTracking  # where the trial's MLflow run lives


def _train_and_report(train_config: TrainConfig, inputs: DatasetInputs, report_api, tracking_uri: str, run_id: str) -> None:
    """Train, logging every epoch to the trial's MLflow run (rank 0) and reporting it with a
    resumable checkpoint; continue from the last one.

    `report_api` is `ray.train` on a Train worker and `ray.tune` in an inline trial: both have
    `report`, `get_checkpoint` and `Checkpoint`."""
    for storage_logger in ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage"):
        # Both log one INFO line per saved checkpoint, i.e. per epoch of every trial.
        logging.getLogger(storage_logger).setLevel(logging.WARNING)
    dataset = inputs.load(train_config)
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
        train_seed_group(train_config, dataset=dataset, on_epoch=report, replace_stale_out=True)
    else:
        with checkpoint.as_directory() as folder:
            train_seed_group(train_config, dataset=dataset, on_epoch=report, resume_from=Path(folder))


def worker_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    _train_and_report(loop_config["train"], loop_config["inputs"], ray.train, loop_config["tracking_uri"],
                      loop_config["run_id"])


def run_trial(config: dict[str, Any], contexts: dict[str, PairContext]) -> None:
    """The Tune function trainable: inline for one worker, else one data-parallel TorchTrainer.
    `config` is the trial's train config plus its pair (`PAIR_KEY`), whose context it runs in."""
    context = contexts[config[PAIR_KEY]]
    require_run_dir(context.run_dir.root)
    trial_id = tune.get_context().get_trial_id()
    finished = _finished_in_study(context, trial_id) if context.resuming else None
    if finished is not None:  # finished after a killed driver last saved Tune's state: not trained again
        tune.report({"epoch": max(finished.intermediate_values, default=0), context.tune_metric: finished.value,
                     "final": float(finished.state == TrialState.COMPLETE)})
        return
    # Resolved once here; tracking, the dataset's inputs and the training loop all read this one.
    train_config = resolve_config({**without_pair(config), "out": str(context.run_dir.trial(context.pair, trial_id))},
                                  where=f"trial {trial_id} config")
    run_id = open_trial_run(context.tracking, trial_id, train_config)
    if context.shape.inline:
        _train_and_report(train_config, context.inputs, tune, context.tracking.uri, run_id)
        return
    shape = context.shape
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"train": train_config, "inputs": context.inputs,
                           "tracking_uri": context.tracking.uri, "run_id": run_id},
        scaling_config=ScalingConfig(num_workers=shape.workers, use_gpu=shape.use_gpu,
                                     resources_per_worker=shape.per_worker, placement_strategy=shape.placement),
        run_config=RunConfig(
            name=trial_id,  # stable per trial, so a retried or restored trial finds its checkpoint
            storage_path=str(context.run_dir.train_storage(context.pair)),
            callbacks=[TuneReportCallback()],
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=context.max_failures),
        ),
    )
    trainer.fit()


def without_pair(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's train config: its Tune config without the pair it belongs to."""
    return {key: value for key, value in config.items() if key != PAIR_KEY}


def _finished_in_study(context: PairContext, trial_id: str) -> optuna.trial.FrozenTrial | None:
    """The study's record of this trial if it already finished (COMPLETE or PRUNED): it did so
    after a killed driver last saved Tune's state, so Tune restored it as unfinished."""
    study = optuna.load_study(study_name=context.pair, storage=context.run_dir.study_url(context.pair))
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return next((t for t in done if t.user_attrs.get("ray_trial_id") == trial_id), None)
