"""`train_loop`: the only training loop. `msa train` runs it in-process; every Ray trial runs it
too (in its Tune trial actor when it has one worker, else in each Ray Train worker), and so do
the ensembles' retrainings.

It builds the model from the registry (behind a Hugging Face text encoder when the config names
one, `text_encoder.py`), wraps it with `deepspeed.initialize` (ZeRO stage and
precision from the config; gloo and fp32 on CPU, NCCL and bf16 on GPU), trains with early
stopping on a **valid** metric, and keeps the best epoch in a checkpoint folder
(`checkpoint.py`). Test is predicted only for epochs that improve valid and is never used to
choose anything.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from msa.models.registry import build_model, get_entry
from msa.platform.core.errors import MsaError
from msa.platform.core.metrics import DEFAULT_SELECTION_METRIC, SUITE_METRICS, compute_metrics, is_better
from msa.platform.data.features import FeatureSet
from msa.platform.data.readers import load_dataset
from msa.platform.data.text import resolve_encoder
from msa.platform.training.checkpoint import CheckpointWriter
from msa.platform.training.config import TrainConfig, resolve_config
from msa.platform.training.engine import (
    deepspeed_config,
    ensure_process_group,
    full_state_dict,
    import_deepspeed,
    resolve_precision,
    seed_everything,
)
from msa.platform.training.predict import SplitTensors, predict, task_loss
from msa.platform.training.text_encoder import (
    TextEncoderModel,
    encoder_inputs,
    frozen_layers,
    load_encoder,
    parameter_groups,
)

LOOP_STATE_FILE = "loop_state.pt"
ENGINE_TAG = "state"
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


class NonFiniteLossError(MsaError):
    """The training loss became NaN or infinite."""


class InjectedFault(RuntimeError):
    """Raised by ``inject_fault: raise`` (reliability tests and the soak benchmark)."""


@dataclass
class LoopState:
    """Where a run stands after an epoch; saved with the engine state so a trial can resume."""

    epoch: int = 0
    best_score: float | None = None
    best_epoch: int = 0
    best_valid: dict[str, float] = field(default_factory=dict)
    best_test: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


def _has_frozen_parameters(engine) -> bool:
    """Frozen parameters (a text encoder's frozen layers) are rebuilt from the pretrained weights
    when a run starts, so a resumable state need not hold them (with MiniLM: most of its size)."""
    return any(not p.requires_grad for p in engine.module.parameters())


def save_state(directory: Path, engine, state: LoopState, order: torch.Generator) -> None:
    """Write everything a resumed run needs into `directory` (collective: every rank calls it)."""
    engine.save_checkpoint(str(directory), tag=ENGINE_TAG, exclude_frozen_parameters=_has_frozen_parameters(engine))
    if torch.distributed.get_rank() == 0:
        payload = {**dataclasses.asdict(state), "order": order.get_state(), "torch_rng": torch.get_rng_state()}
        torch.save(payload, directory / LOOP_STATE_FILE)


def load_state(directory: Path, engine, order: torch.Generator) -> LoopState:
    """Restore engine, batch order, RNG and loop state saved by `save_state`."""
    if not (directory / LOOP_STATE_FILE).is_file():
        raise MsaError(f"{directory}: not a resumable training state ({LOOP_STATE_FILE} missing)")
    engine.load_checkpoint(str(directory), tag=ENGINE_TAG, load_module_strict=not _has_frozen_parameters(engine))
    payload = torch.load(directory / LOOP_STATE_FILE, weights_only=True)
    order.set_state(payload.pop("order"))
    torch.set_rng_state(payload.pop("torch_rng"))
    return LoopState(**payload)


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
) -> TrainResult:
    """Train one model with DeepSpeed; its checkpoint folder always holds the best epoch so far.

    Args:
        config: a `TrainConfig` or a mapping of its fields.
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

    Returns:
        The best epoch's valid and test metrics, the history, and where the checkpoint is.

    Raises:
        MsaError: bad config or data, an existing output folder, or a NaN/inf training loss.
    """
    config, dataset = prepare_run(config, dataset)
    out_dir = Path(config.out or default_out_dir(config, dataset))
    if out_dir.exists() and resume_from is None and not replace_stale_out:
        raise MsaError(f"output folder {out_dir} already exists; choose another --out")
    run = _Run(config, dataset, out_dir)
    state = load_state(Path(resume_from), run.engine, run.order) if resume_from is not None else LoopState()
    if run.rank == 0 and resume_from is None and replace_stale_out and out_dir.exists():
        shutil.rmtree(out_dir)
    writer = (CheckpointWriter(out_dir, config, run.engine.module.config, dataset, text_encoder=run.text_encoder)
              if run.rank == 0 else None)
    for epoch in range(state.epoch + 1, config.epochs + 1):
        if config.inject_fault != "none" and epoch == config.inject_fault_epoch and resume_from is None:
            _inject_fault(config.inject_fault, epoch, run.rank, run.world)
        record = run.epoch(epoch, state, writer, keep_last_epoch)
        state.history.append(record)
        state.epoch = epoch
        if on_epoch is not None:
            on_epoch(record, lambda directory: save_state(Path(directory), run.engine, state, run.order))
        if record["final"]:
            break
    if state.best_score is None:
        raise MsaError(f"valid {config.selection_metric} was NaN in every epoch; nothing to select")
    if writer is not None:
        writer.write_history(state.history)
    return TrainResult(
        out_dir=out_dir, best_epoch=state.best_epoch, selection_metric=config.selection_metric,
        valid_metrics=state.best_valid, test_metrics=state.best_test, history=state.history,
        weights_sha256=writer.weights_sha256 if writer is not None else "",
    )


class _Run:
    """One run's DeepSpeed engine, device tensors and batch order, and its epoch."""

    def __init__(self, config: TrainConfig, dataset: FeatureSet, out_dir: Path):
        self.config, self.dataset = config, dataset
        use_cuda = torch.cuda.is_available()
        deepspeed = import_deepspeed(use_cuda)
        ensure_process_group(deepspeed, use_cuda)
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        self.device = device
        seed_everything(config.seed)
        model = build_model(config.model, dataset.spec, config.model_config)
        encoder = config.text_encoder
        self.text_encoder = resolve_encoder(encoder.path) if encoder.path else None
        if self.text_encoder is not None:
            model = TextEncoderModel(load_encoder(self.text_encoder.folder), model,
                                     frozen_layers(encoder, self.text_encoder.depth),
                                     gradient_checkpointing=encoder.gradient_checkpointing)
        optimizer = torch.optim.AdamW(parameter_groups(model, config.lr, config.weight_decay, encoder))
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(config, config.precision)
        )
        if self.world == 1 and config.zero_stage == 0:
            # One rank without ZeRO: the gradient all-reduce after each backward is an identity that
            # still flattens and copies every gradient (about 6% of a TFN step on CPU).
            self.engine.enable_backward_allreduce = False
        dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
        self.splits = {name: SplitTensors(split, device, dtype, dataset.task) for name, split in dataset.splits.items()}
        self.order = torch.Generator().manual_seed(config.seed)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over this rank's share of train; the mean of every loss term."""
        config, train = self.config, self.splits["train"]
        self.engine.train()
        sums: dict[str, torch.Tensor] = {}  # summed on the device: no host sync per step
        steps = 0
        permutation = torch.randperm(train.size, generator=self.order)[self.rank::self.world].to(self.device)
        for start in range(0, len(permutation), config.batch_size):
            features, lengths, labels = train.batch(permutation[start : start + config.batch_size])
            output = self.engine(features, lengths, labels)
            loss = task_loss(output.prediction, labels, self.dataset.task, config.regression_loss)
            terms = {"task_loss": loss.detach()}
            for name, value in output.aux_losses.items():
                loss = loss + self.engine.module.loss_weights[name] * value.float()
                terms[name] = value.detach().float()
            terms["loss"] = loss.detach()
            self.engine.backward(loss)
            self.engine.step()
            for name, value in terms.items():
                sums[name] = sums[name] + value if name in sums else value
            steps += 1
        means = {name: float(total) / max(steps, 1) for name, total in sums.items()}  # float(): syncs the device
        if not math.isfinite(means.get("loss", 0.0)):
            raise NonFiniteLossError(
                f"training loss became {means['loss']} in epoch {epoch}; lower lr or check the data"
            )
        return means

    def predict(self, split: str):
        tensors = self.splits[split]
        return predict(self.engine, tensors.features, tensors.lengths, self.dataset.task, self.config.batch_size)

    def epoch(self, epoch: int, state: LoopState, writer: CheckpointWriter | None, keep_last_epoch: bool) -> dict[str, float]:
        """Train, score valid, publish the checkpoint if it improved; the epoch's record."""
        config, dataset, selection = self.config, self.dataset, self.config.selection_metric
        started = time.perf_counter()
        means = self.train_epoch(epoch)
        training_seconds = time.perf_counter() - started
        valid_pred = self.predict("valid")
        valid_metrics = compute_metrics(dataset.metric_suite, valid_pred, dataset.splits["valid"].labels)
        record = {"epoch": epoch, **{f"train_{k}": v for k, v in means.items()}}
        record.update({f"valid_{k}": v for k, v in valid_metrics.items()})
        improved = keep_last_epoch or is_better(selection, valid_metrics[selection], state.best_score)
        if improved:
            test_pred = self.predict("test")
            state.best_score, state.best_epoch, state.best_valid = valid_metrics[selection], epoch, valid_metrics
            state.best_test = compute_metrics(dataset.metric_suite, test_pred, dataset.splits["test"].labels)
            weights = full_state_dict(self.engine, config.zero_stage)
            if writer is not None:
                writer.write_best(weights, {"valid": valid_pred, "test": test_pred}, state.best_epoch,
                                  state.best_valid, state.best_test, state.history + [record])
        record["improved"] = float(improved)
        record[f"best_valid_{selection}"] = state.best_score if state.best_score is not None else math.nan
        stop = epoch == config.epochs or (not keep_last_epoch and epoch - state.best_epoch >= config.patience)
        record["final"] = float(stop)
        record["training_seconds"] = training_seconds  # the optimisation steps alone
        record["epoch_seconds"] = time.perf_counter() - started  # plus valid (and test) prediction, checkpoint
        return record


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
