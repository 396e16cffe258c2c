"""`train_loop`: the only training loop. `msa train` runs it in-process; every Ray trial runs it
too (in its Tune trial actor when it has one worker, else in each Ray Train worker), and so do
the ensembles' retrainings.

It builds the model from the registry (behind a Hugging Face text encoder when the config names
one, `text_encoder.py`), wraps it with `deepspeed.initialize` (ZeRO stage and
precision from the config; gloo and fp32 on CPU, NCCL and bf16 on GPU), trains with early
stopping on a **valid** metric, and keeps the best epoch in a checkpoint folder
(`checkpoint.py`). Test is predicted only for epochs that improve valid and is never used to
choose anything. `train_seed_group` trains one config with several seeds in lock-step (a sweep's
``budget.seeds_per_trial``), each seed exactly as it would train alone; one run's engine, state
and epoch are `run.py`'s.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import signal
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from msa.models.registry import get_entry
from msa.platform.core.errors import MsaError
from msa.platform.core.metrics import DEFAULT_SELECTION_METRIC, SUITE_METRICS
from msa.platform.data.features import FeatureSet
from msa.platform.data.readers import load_dataset
from msa.platform.training.checkpoint import CheckpointWriter, seed_folder
from msa.platform.training.config import TrainConfig, resolve_config
from msa.platform.training.engine import resolve_precision
from msa.platform.training.progress import EpochProgress
from msa.platform.training.run import LoopState, Run, load_state, rng_state, save_state, set_rng_state
from msa.platform.training.text_encoder import encoder_inputs

KILL_DELAY_S = 4.0  # see _inject_fault


@dataclass
class TrainResult:
    """What a finished run produced (rank 0 also wrote it under `out_dir`)."""

    out_dir: Path
    best_epoch: int
    selection_metric: str
    valid_metrics: dict[str, float]
    test_metrics: dict[str, float]
    history: list[dict[str, float]]
    weights_sha256: str


class InjectedFault(RuntimeError):
    """Raised by ``inject_fault: raise`` (reliability tests and the soak benchmark)."""


def prepare_run(config: TrainConfig | dict[str, Any], dataset: FeatureSet | None = None) -> tuple[TrainConfig, FeatureSet]:
    """The validated config (selection metric and precision resolved) and its dataset as the
    model reads it (with a text encoder: token ids or the frozen prefix's hidden states): every
    check on the inputs, before anything is built or written.

    Raises:
        MsaError: bad config or data, a model that needs more modalities than the data has, a
            selection metric the data's suite lacks, or a text encoder that cannot read the data.
    """
    config = resolve_config(config)
    dataset = dataset if dataset is not None else load_dataset(config.data, replace_nonfinite=config.replace_nonfinite)
    if config.text_encoder.path:
        dataset, _ = encoder_inputs(dataset, config.text_encoder)
    get_entry(config.model).require_modalities(config.model, dataset.modalities, what=f"dataset {dataset.source or dataset.name}")
    suite = dataset.metric_suite
    selection = config.selection_metric or DEFAULT_SELECTION_METRIC[suite]
    if selection not in SUITE_METRICS[suite]:
        raise MsaError(
            f"selection_metric {selection!r} is not a {suite} metric; choose one of {', '.join(SUITE_METRICS[suite])}"
        )
    precision = resolve_precision(config.precision, torch.cuda.is_available())
    return dataclasses.replace(config, selection_metric=selection, precision=precision), dataset


def train_loop(
    config: TrainConfig | dict[str, Any],
    *,
    dataset: FeatureSet | None = None,
    on_epoch: Callable[[dict[str, float], Callable[[Path], None]], None] | None = None,
    resume_from: Path | None = None,
    replace_stale_out: bool = False,
    keep_last_epoch: bool = False,
    progress: EpochProgress | None = None,
) -> TrainResult:
    """Train one model with DeepSpeed; its checkpoint folder always holds the best epoch so far.

    Args:
        config: a `TrainConfig` or a mapping of its fields (``seeds`` must be 1; see
            `train_seed_group`).
        dataset: an already-loaded dataset (a sweep shares one); read from ``config.data`` if None.
        on_epoch: called after each epoch with that epoch's record (losses, valid metrics,
            ``best_valid_<metric>``, ``final`` = 1.0 on the run's natural last epoch) and a
            function that saves the resumable state into a folder (collective across ranks).
        resume_from: a folder written by that function: continue after its epoch. The output
            folder may then already exist (it holds the best epoch before the interruption).
        replace_stale_out: the caller owns the output folder (a sweep trial's): when starting
            afresh, a folder left by an earlier attempt that never saved its state is deleted
            instead of refused.
        keep_last_epoch: train exactly ``config.epochs`` epochs and keep the last one, choosing
            nothing on valid (the out-of-fold protocol, whose "valid" is the held-out fold).
        progress: shows rank 0's way through each epoch's batches (`msa train` passes one;
            sweep trials and retrainings pass none and print nothing per batch).

    Returns:
        The best epoch's valid and test metrics, the history, and where the checkpoint is.

    Raises:
        MsaError: bad config or data, an existing output folder, or a NaN/inf training loss.
    """
    config = resolve_config(config)
    if config.seeds != 1:
        raise MsaError(f"train config: seeds={config.seeds} trains a seed group; train_loop trains one model")
    (result,) = train_seed_group(config, dataset=dataset, on_epoch=on_epoch, resume_from=resume_from,
                                 replace_stale_out=replace_stale_out, keep_last_epoch=keep_last_epoch,
                                 progress=progress)
    return result


def train_seed_group(
    config: TrainConfig | dict[str, Any],
    *,
    dataset: FeatureSet | None = None,
    on_epoch: Callable[[dict[str, float], Callable[[Path], None]], None] | None = None,
    resume_from: Path | None = None,
    replace_stale_out: bool = False,
    keep_last_epoch: bool = False,
    progress: EpochProgress | None = None,
) -> list[TrainResult]:
    """Train the config with each of its ``seeds`` seeds (``seed``, ``seed + 1``, ...), in
    lock-step: every epoch, each seed still training trains one epoch, then `on_epoch` gets the
    group's record (`group_record`: the seed mean of ``best_valid_<metric>``, each seed's own
    values beside it) and a function that saves every seed's resumable state (``seed-<k>/``
    inside the folder). Each seed keeps its own early stopping, checkpoint folder
    (``out/seed-<k>/``), batch order and torch RNG stream, so its run is exactly the one
    ``seeds=1`` with that seed trains. With one seed this is `train_loop` (its folder is ``out``).
    Arguments as for `train_loop`; returns one result per seed.
    """
    config, dataset = prepare_run(config, dataset)
    out_dir = Path(config.out or default_out_dir(config, dataset))
    if out_dir.exists() and resume_from is None and not replace_stale_out:
        raise MsaError(f"output folder {out_dir} already exists; choose another --out")
    seeds = [config.seed + offset for offset in range(config.seeds)]
    grouped = len(seeds) > 1
    runs: list[_SeedRun] = []
    for seed in seeds:
        seed_config = dataclasses.replace(config, seed=seed, seeds=1,
                                          out=str(seed_folder(out_dir, seed) if grouped else out_dir))
        resume = None if resume_from is None else seed_folder(Path(resume_from), seed) if grouped else Path(resume_from)
        runs.append(_SeedRun(seed_config, dataset, seeds if grouped else None, resume, replace_stale_out,
                             splits=runs[0].run.splits if runs else None, progress=progress))

    def save_all(directory: Path) -> None:
        for run in runs:
            folder = seed_folder(Path(directory), run.config.seed) if grouped else Path(directory)
            folder.mkdir(parents=True, exist_ok=True)
            run.save(folder)

    for epoch in range(max(run.state.epoch for run in runs) + 1, config.epochs + 1):
        if all(run.finished for run in runs):  # (resumed from a state saved after its last epoch)
            break
        records = {}
        for run in runs:
            if not run.finished:
                fault = config.inject_fault != "none" and epoch == config.inject_fault_epoch and resume_from is None
                records[run.config.seed] = run.step(epoch, keep_last_epoch, fault and run is runs[-1])
        if on_epoch is not None:
            on_epoch(group_record(epoch, records, runs, config.selection_metric), save_all)
    return [run.result() for run in runs]


def group_record(epoch: int, records: dict[int, dict[str, float]], runs: list["_SeedRun"], selection: str) -> dict[str, float]:
    """The epoch's record of a seed group: what Tune, ASHA and Optuna read. One seed: its own
    record. Several: ``best_valid_<metric>`` is the mean over the seeds of each one's best so far
    (a seed that stopped early counts with its final best) and ``best_valid_<metric>_sd`` their
    spread; losses, valid metrics and seconds are over the seeds that trained this epoch (means;
    seconds summed); ``final`` once every seed has finished; and ``seed<k>_...`` keeps each seed's
    best, valid score and training loss visible."""
    if len(runs) == 1:
        return next(iter(records.values()))
    best_key = f"best_valid_{selection}"
    bests = {run.config.seed: run.state.best_score for run in runs}
    finite = [value for value in bests.values() if value is not None and math.isfinite(value)]
    record: dict[str, float] = {"epoch": epoch}
    for key in records[next(iter(records))]:
        if key.startswith(("train_", "valid_")):
            record[key] = sum(r[key] for r in records.values()) / len(records)
    record[best_key] = sum(finite) / len(finite) if finite else math.nan
    record[f"{best_key}_sd"] = statistics.stdev(finite) if len(finite) > 1 else 0.0
    record["improved"] = float(any(r["improved"] for r in records.values()))
    record["final"] = float(all(run.finished for run in runs))
    record["seeds_training"] = float(len(records))
    for key in ("training_seconds", "epoch_seconds"):
        record[key] = sum(r[key] for r in records.values())
    for seed, best in bests.items():
        record[f"seed{seed}_{best_key}"] = math.nan if best is None else best
        if seed in records:
            record[f"seed{seed}_valid_{selection}"] = records[seed][f"valid_{selection}"]
            record[f"seed{seed}_train_loss"] = records[seed]["train_loss"]
    return record


class _SeedRun:
    """One seed of a training run: its engine (`Run`), loop state, checkpoint writer and its own
    torch RNG stream, swapped in for its steps (dropout draws from the global generator, and
    the seeds of a group take turns in one process)."""

    def __init__(self, config: TrainConfig, dataset: FeatureSet, group: list[int] | None, resume_from: Path | None,
                 replace_stale_out: bool, splits: dict | None = None, progress: EpochProgress | None = None):
        """`group`: every seed of the group this run belongs to (None alone); `splits`: the
        device tensors of the data, shared with the group's other seeds; `progress`: shows
        this seed's epochs (rank 0 only)."""
        self.config = config
        out_dir = Path(config.out)
        self.run = Run(config, dataset, out_dir, splits)  # seeds the global generators
        self.progress = progress if self.run.rank == 0 else None
        self.progress_prefix = f"seed {config.seed} " if group else ""
        self.rng = rng_state()
        if resume_from is not None:
            self.state, cpu_rng = load_state(resume_from, self.run.engine, self.run.order)
            self.rng = (cpu_rng, self.rng[1])
        else:
            self.state = LoopState()
        if self.run.rank == 0 and resume_from is None and replace_stale_out and out_dir.exists():
            shutil.rmtree(out_dir)
        self.writer = (CheckpointWriter(out_dir, config, self.run.engine.module.config, dataset,
                                        text_encoder=self.run.text_encoder, seed_group=group)
                       if self.run.rank == 0 else None)

    @property
    def finished(self) -> bool:
        return bool(self.state.history) and bool(self.state.history[-1]["final"])

    def step(self, epoch: int, keep_last_epoch: bool, inject_fault: bool) -> dict[str, float]:
        set_rng_state(self.rng)
        if inject_fault:
            _inject_fault(self.config.inject_fault, epoch, self.run.rank, self.run.world)
        if self.progress is None:
            record = self.run.epoch(epoch, self.state, self.writer, keep_last_epoch)
        else:
            self.progress.start(f"{self.progress_prefix}epoch {epoch}/{self.config.epochs}", self.run.train_batches)
            try:
                record = self.run.epoch(epoch, self.state, self.writer, keep_last_epoch, self.progress)
            finally:
                self.progress.finish()
        self.state.history.append(record)
        self.state.epoch = epoch
        self.rng = rng_state()
        if record["final"] and self.writer is not None and self.state.best_score is not None:
            self.writer.write_history(self.state.history)
        return record

    def save(self, directory: Path) -> None:
        save_state(directory, self.run.engine, self.state, self.run.order, self.rng[0])

    def result(self) -> TrainResult:
        if self.state.best_score is None:
            raise MsaError(f"valid {self.config.selection_metric} was NaN in every epoch; nothing to select")
        return TrainResult(
            out_dir=Path(self.config.out), best_epoch=self.state.best_epoch, selection_metric=self.config.selection_metric,
            valid_metrics=self.state.best_valid, test_metrics=self.state.best_test, history=self.state.history,
            weights_sha256=self.writer.weights_sha256 if self.writer is not None else "",
        )


def _inject_fault(kind: str, epoch: int, rank: int, world: int) -> None:
    if kind == "raise":
        raise InjectedFault(f"injected fault: rank {rank} raised at the start of epoch {epoch}")
    if rank == world - 1:  # "kill": a real process death, as an OOM kill or a lost node would be
        # Ray collects reported checkpoints every 2 s (Train's worker poll; Tune's result fetch),
        # so a death sooner than that after a report also loses that report. Waiting models a
        # death some seconds into an epoch, as in any run whose epochs last longer than that.
        time.sleep(KILL_DELAY_S)
        os.kill(os.getpid(), signal.SIGKILL)


def default_out_dir(config: TrainConfig, dataset: FeatureSet) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return Path("runs") / "train" / f"{config.model}-{dataset.name}-seed{config.seed}-{stamp}"
