"""One training run's parts: its DeepSpeed engine, device tensors, batch order and epoch (`Run`),
where it stands (`LoopState`), its resumable state on disk (`save_state` / `load_state`) and its
torch RNG stream. `train_loop` (`loop.py`) drives one or, for a seed group, several of them; it
runs wherever that does (the `msa train` process, a Tune trial actor or a Ray Train worker).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from msa.models.registry import build_model
from msa.platform.core.errors import MsaError
from msa.platform.core.metrics import compute_metrics, is_better
from msa.platform.data.features import FeatureSet
from msa.platform.data.text import resolve_encoder
from msa.platform.training.checkpoint import CheckpointWriter
from msa.platform.training.config import TrainConfig
from msa.platform.training.engine import (
    deepspeed_config,
    ensure_process_group,
    full_state_dict,
    import_deepspeed,
    seed_everything,
)
from msa.platform.training.predict import SplitTensors, predict, task_loss
from msa.platform.training.progress import EpochProgress
from msa.platform.training.text_encoder import TextEncoderModel, frozen_layers, load_encoder, parameter_groups

LOOP_STATE_FILE = "loop_state.pt"
ENGINE_TAG = "state"


class NonFiniteLossError(MsaError):
    """The training loss became NaN or infinite."""


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


def save_state(directory: Path, engine, state: LoopState, order: torch.Generator, rng: torch.Tensor) -> None:
    """Write everything a resumed run needs into `directory` (collective: every rank calls it);
    `rng` is the run's torch RNG state (in a seed group, not the process's current one)."""
    engine.save_checkpoint(str(directory), tag=ENGINE_TAG, exclude_frozen_parameters=_has_frozen_parameters(engine))
    if torch.distributed.get_rank() == 0:
        payload = {**dataclasses.asdict(state), "order": order.get_state(), "torch_rng": rng}
        torch.save(payload, directory / LOOP_STATE_FILE)


def load_state(directory: Path, engine, order: torch.Generator) -> tuple[LoopState, torch.Tensor]:
    """Restore engine, batch order and loop state saved by `save_state`; returns the loop state
    and the run's torch RNG state."""
    if not (directory / LOOP_STATE_FILE).is_file():
        raise MsaError(f"{directory}: not a resumable training state ({LOOP_STATE_FILE} missing)")
    engine.load_checkpoint(str(directory), tag=ENGINE_TAG, load_module_strict=not _has_frozen_parameters(engine))
    payload = torch.load(directory / LOOP_STATE_FILE, weights_only=True)
    order.set_state(payload.pop("order"))
    rng = payload.pop("torch_rng")
    return LoopState(**payload), rng


def rng_state() -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


class Run:
    """One run's DeepSpeed engine, device tensors and batch order, and its epoch."""

    def __init__(self, config: TrainConfig, dataset: FeatureSet, out_dir: Path, splits: dict | None = None):
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
        self.splits = splits or {name: SplitTensors(split, device, dtype, dataset.task)
                                 for name, split in dataset.splits.items()}
        self.order = torch.Generator().manual_seed(config.seed)

    @property
    def train_batches(self) -> int:
        """Batches in this rank's share of train, every epoch."""
        share = self.splits["train"].size // self.world
        return -(-share // self.config.batch_size)

    def train_epoch(self, epoch: int, progress: EpochProgress | None = None) -> dict[str, float]:
        """One pass over this rank's share of train, each batch counted on `progress`; the mean
        of every loss term."""
        config, train = self.config, self.splits["train"]
        self.engine.train()
        sums: dict[str, torch.Tensor] = {}  # summed on the device: no host sync per step
        steps = 0
        # Every rank takes the same number of clips (the last train.size % world of the shuffled
        # order sit this epoch out), hence the same number of steps: a rank with one more would
        # wait forever in a collective the others never join.
        order = torch.randperm(train.size, generator=self.order)
        permutation = order[: len(order) - len(order) % self.world][self.rank::self.world].to(self.device)
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
            if progress is not None:
                progress.advance()
        means = {name: float(total) / max(steps, 1) for name, total in sums.items()}  # float(): syncs the device
        if not math.isfinite(means.get("loss", 0.0)):
            raise NonFiniteLossError(
                f"training loss became {means['loss']} in epoch {epoch}; lower lr or check the data"
            )
        return means

    def predict(self, split: str):
        tensors = self.splits[split]
        return predict(self.engine, tensors.features, tensors.lengths, self.dataset.task, self.config.batch_size,
                       tensors.dtype)

    def epoch(self, epoch: int, state: LoopState, writer: CheckpointWriter | None, keep_last_epoch: bool,
              progress: EpochProgress | None = None) -> dict[str, float]:
        """Train, score valid, publish the checkpoint if it improved; the epoch's record.
        `progress` (started by the caller) counts the batches and is told of the predictions."""
        config, dataset, selection = self.config, self.dataset, self.config.selection_metric
        started = time.perf_counter()
        means = self.train_epoch(epoch, progress)
        training_seconds = time.perf_counter() - started
        if progress is not None:
            progress.note("predicting valid")
        valid_pred = self.predict("valid")
        valid_metrics = compute_metrics(dataset.metric_suite, valid_pred, dataset.splits["valid"].labels)
        record = {"epoch": epoch, **{f"train_{k}": v for k, v in means.items()}}
        record.update({f"valid_{k}": v for k, v in valid_metrics.items()})
        improved = keep_last_epoch or is_better(selection, valid_metrics[selection], state.best_score)
        if improved:
            if progress is not None:
                progress.note("predicting test")
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
