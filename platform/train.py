"""`train_loop`: the only training loop. `msa train` runs it in-process; every Ray trial runs it too.

It builds the model from the registry, wraps it with `deepspeed.initialize` (ZeRO stage and
precision from the config; gloo and fp32 on CPU, NCCL and bf16 on GPU), trains with early
stopping on a **valid** metric, and writes a checkpoint folder holding the weights, the resolved
config, valid and test predictions with ids, the metrics, and the weights' SHA-256. Test is
predicted only for epochs that improve valid and is never used to choose anything.
"""
from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import logging
import math
import os
import random
import shutil
import signal
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from msa.models.registry import build_model, get_entry
from msa.platform.config import build_dataclass, to_plain
from msa.platform.errors import MsaError
from msa.platform.features import FeatureSet, Split
from msa.platform.metrics import DEFAULT_SELECTION_METRIC, METRIC_MODES, SUITE_METRICS, compute_metrics, is_better
from msa.platform.readers import atomic_write, load_dataset, sha256_path

WEIGHTS_FILE = "model.pt"
LOOP_STATE_FILE = "loop_state.pt"
ENGINE_TAG = "state"
KILL_DELAY_S = 4.0  # see _inject_fault


@dataclass
class TrainConfig:
    """Everything one training run needs; loaded from YAML and ``key=value`` overrides.

    Args:
        model: a name from the model registry.
        data: path of the dataset (npz, MMSA pickle or MIntRec folder).
        out: output folder for the checkpoint; must not exist yet ("" picks one under runs/train).
        seed: seeds model initialisation and batch order; same seed, same result on CPU.
        epochs: maximum number of epochs.
        batch_size: micro-batch per worker.
        lr, weight_decay: AdamW settings.
        grad_clip: gradient-norm clip (0 disables).
        patience: epochs without a valid improvement before stopping.
        selection_metric: valid metric that picks the best epoch ("" = MAE for regression,
            accuracy for classification).
        regression_loss: ``l1`` (MMSA's default) or ``mse``.
        zero_stage: DeepSpeed ZeRO stage.
        precision: ``auto`` (bf16 on GPU, fp32 on CPU), ``fp32`` or ``bf16``.
        replace_nonfinite: set NaN/inf features to 0 instead of refusing the data.
        model_config: overrides of the model's own config dataclass.
        inject_fault: reliability testing only (RELIABILITY.md): ``raise`` makes every rank
            raise, ``kill`` makes the last rank SIGKILL its own process, at the start of epoch
            ``inject_fault_epoch`` of an attempt that did not resume from a checkpoint (so a
            retry from the last checkpoint goes past it). ``none`` in real runs.
    """

    model: str = "baseline"
    data: str = ""
    out: str = ""
    seed: int = 0
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    patience: int = 6
    selection_metric: str = ""
    regression_loss: Literal["l1", "mse"] = "l1"
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    replace_nonfinite: bool = False
    model_config: dict[str, Any] = field(default_factory=dict)
    inject_fault: Literal["none", "raise", "kill"] = "none"
    inject_fault_epoch: int = 2


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


def resolve_config(config: TrainConfig | dict[str, Any], *, where: str = "train config") -> TrainConfig:
    """A validated `TrainConfig` (from a mapping if needed); raises MsaError naming `where`."""
    if isinstance(config, dict):
        config = build_dataclass(TrainConfig, config, where=where)
    get_entry(config.model)
    for name, low in (("epochs", 1), ("batch_size", 1), ("patience", 1), ("inject_fault_epoch", 1)):
        if getattr(config, name) < low:
            raise MsaError(f"train config: {name} must be >= {low}, got {getattr(config, name)}")
    if config.lr <= 0:
        raise MsaError(f"train config: lr must be > 0, got {config.lr}")
    if not config.data:
        raise MsaError("train config: no data path given (--data PATH or data: in the config)")
    return config


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _import_deepspeed(use_cuda: bool):
    """Import DeepSpeed for this device, quietly, without its JIT-built shared-memory op."""
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # Every init_distributed would otherwise JIT-compile an inference-only op (~40 s, see STACK.md).
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def _ensure_process_group(deepspeed, use_cuda: bool) -> None:
    """Join the existing process group (Ray Train) or make a one-rank group for in-process runs.

    The one-rank group uses an in-memory store: no port, and no MASTER_* variables left in the
    environment for child processes to inherit."""
    if not torch.distributed.is_initialized():
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts it is set
        torch.distributed.init_process_group(
            backend="nccl" if use_cuda else "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1
        )
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", auto_mpi_discovery=False)


def deepspeed_config(config: TrainConfig, precision: str) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": {"stage": config.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class SplitTensors:
    """A split's arrays moved to the device once; batches are index selections, not copies from disk."""

    def __init__(self, split: Split, device: torch.device, dtype: torch.dtype, task: str):
        label_dtype = torch.float32 if task == "regression" else torch.long
        with warnings.catch_warnings():
            # Arrays from Ray's object store are read-only; these tensors are only ever indexed
            # (a copy), never written, so sharing the memory is safe.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self.features = {m: torch.as_tensor(a, device=device, dtype=dtype) for m, a in split.features.items()}
            self.lengths = {m: torch.as_tensor(a, device=device) for m, a in split.lengths.items()}
            self.labels = torch.as_tensor(split.labels, device=device, dtype=label_dtype)
        self.size = len(split)

    def batch(self, index: torch.Tensor):
        return (
            {m: x[index] for m, x in self.features.items()},
            {m: n[index] for m, n in self.lengths.items()},
            self.labels[index],
        )


def task_loss(prediction: torch.Tensor, labels: torch.Tensor, task: str, regression_loss: str) -> torch.Tensor:
    prediction = prediction.float()
    if task == "classification":
        return F.cross_entropy(prediction, labels)
    return F.l1_loss(prediction, labels) if regression_loss == "l1" else F.mse_loss(prediction, labels)


@torch.no_grad()
def predict(engine, features: dict[str, torch.Tensor], lengths: dict[str, torch.Tensor], task: str,
            batch_size: int) -> np.ndarray:
    """Predictions for whole split arrays: ``(N,)`` scores or ``(N, C)`` class probabilities.

    The registered pyfunc model predicts through this too, so it reproduces stored predictions."""
    engine.eval()
    outputs = []
    size = len(next(iter(features.values())))
    for start in range(0, size, batch_size):
        part = slice(start, start + batch_size)
        prediction = engine({m: x[part] for m, x in features.items()}, {m: n[part] for m, n in lengths.items()}).prediction.float()
        outputs.append(prediction.softmax(-1) if task == "classification" else prediction)
    return torch.cat(outputs).cpu().numpy()


@dataclass
class LoopState:
    """Where a run stands after an epoch; saved with the engine state so a trial can resume."""

    epoch: int = 0
    best_score: float | None = None
    best_epoch: int = 0
    best_valid: dict[str, float] = field(default_factory=dict)
    best_test: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


def save_state(directory: Path, engine, state: LoopState, order: torch.Generator) -> None:
    """Write everything a resumed run needs into `directory` (collective: every rank calls it)."""
    engine.save_checkpoint(str(directory), tag=ENGINE_TAG)
    if torch.distributed.get_rank() == 0:
        payload = {**dataclasses.asdict(state), "order": order.get_state(), "torch_rng": torch.get_rng_state()}
        torch.save(payload, directory / LOOP_STATE_FILE)


def load_state(directory: Path, engine, order: torch.Generator) -> LoopState:
    """Restore engine, batch order, RNG and loop state saved by `save_state`."""
    if not (directory / LOOP_STATE_FILE).is_file():
        raise MsaError(f"{directory}: not a resumable training state ({LOOP_STATE_FILE} missing)")
    engine.load_checkpoint(str(directory), tag=ENGINE_TAG)
    payload = torch.load(directory / LOOP_STATE_FILE, weights_only=True)
    order.set_state(payload.pop("order"))
    torch.set_rng_state(payload.pop("torch_rng"))
    return LoopState(**payload)


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
    config = resolve_config(config)
    dataset = dataset if dataset is not None else load_dataset(config.data, replace_nonfinite=config.replace_nonfinite)
    suite = dataset.metric_suite
    selection = config.selection_metric or DEFAULT_SELECTION_METRIC[suite]
    if selection not in SUITE_METRICS[suite]:
        raise MsaError(
            f"selection_metric {selection!r} is not a {suite} metric; choose one of {', '.join(SUITE_METRICS[suite])}"
        )
    out_dir = Path(config.out or default_out_dir(config, dataset))
    if out_dir.exists() and resume_from is None and not replace_stale_out:
        raise MsaError(f"output folder {out_dir} already exists; choose another --out")

    use_cuda = torch.cuda.is_available()
    precision = config.precision if config.precision != "auto" else ("bf16" if use_cuda else "fp32")
    if precision == "bf16" and not use_cuda:
        raise MsaError("precision bf16 needs a GPU here; use precision=fp32 (or auto) on CPU")
    config = dataclasses.replace(config, selection_metric=selection, precision=precision)
    deepspeed = _import_deepspeed(use_cuda)
    _ensure_process_group(deepspeed, use_cuda)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    seed_everything(config.seed)
    model = build_model(config.model, dataset.spec, config.model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(config, precision)
    )
    if world == 1 and config.zero_stage == 0:
        # One rank without ZeRO: the gradient all-reduce after each backward is an identity that
        # still flattens and copies every gradient (about 6% of a TFN step on CPU).
        engine.enable_backward_allreduce = False
    splits = {name: SplitTensors(split, device, dtype, dataset.task) for name, split in dataset.splits.items()}
    train = splits["train"]
    order = torch.Generator().manual_seed(config.seed)
    state = load_state(Path(resume_from), engine, order) if resume_from is not None else LoopState()
    if rank == 0 and resume_from is None and replace_stale_out and out_dir.exists():
        shutil.rmtree(out_dir)
    writer = CheckpointWriter(out_dir, config, model, dataset) if rank == 0 else None

    for epoch in range(state.epoch + 1, config.epochs + 1):
        if config.inject_fault != "none" and epoch == config.inject_fault_epoch and resume_from is None:
            _inject_fault(config.inject_fault, epoch, rank, world)
        started = time.perf_counter()
        engine.train()
        sums: dict[str, torch.Tensor] = {}  # summed on the device: no host sync per step
        steps = 0
        permutation = torch.randperm(train.size, generator=order)[rank::world].to(device)
        for start in range(0, len(permutation), config.batch_size):
            features, lengths, labels = train.batch(permutation[start : start + config.batch_size])
            output = engine(features, lengths, labels)
            loss = task_loss(output.prediction, labels, dataset.task, config.regression_loss)
            terms = {"task_loss": loss.detach()}
            for name, value in output.aux_losses.items():
                loss = loss + engine.module.loss_weights[name] * value.float()
                terms[name] = value.detach().float()
            terms["loss"] = loss.detach()
            engine.backward(loss)
            engine.step()
            for name, value in terms.items():
                sums[name] = sums[name] + value if name in sums else value
            steps += 1
        means = {name: float(total) / max(steps, 1) for name, total in sums.items()}  # float(): syncs the device
        training_seconds = time.perf_counter() - started
        if not math.isfinite(means.get("loss", 0.0)):
            raise NonFiniteLossError(
                f"training loss became {means['loss']} in epoch {epoch}; lower lr or check the data"
            )
        valid_pred = predict(engine, splits["valid"].features, splits["valid"].lengths, dataset.task, config.batch_size)
        valid_metrics = compute_metrics(suite, valid_pred, dataset.splits["valid"].labels)
        record = {"epoch": epoch, **{f"train_{k}": v for k, v in means.items()}}
        record.update({f"valid_{k}": v for k, v in valid_metrics.items()})
        improved = keep_last_epoch or is_better(selection, valid_metrics[selection], state.best_score)
        if improved:
            test_pred = predict(engine, splits["test"].features, splits["test"].lengths, dataset.task, config.batch_size)
            state.best_score, state.best_epoch, state.best_valid = valid_metrics[selection], epoch, valid_metrics
            state.best_test = compute_metrics(suite, test_pred, dataset.splits["test"].labels)
            weights = {k: v.detach().float().cpu() for k, v in _full_state_dict(engine, config).items()}
            if writer is not None:
                writer.write_best(weights, valid_pred, test_pred, state, state.history + [record])
        record["improved"] = float(improved)
        record[f"best_valid_{selection}"] = state.best_score if state.best_score is not None else math.nan
        stop = epoch == config.epochs or (not keep_last_epoch and epoch - state.best_epoch >= config.patience)
        record["final"] = float(stop)
        record["training_seconds"] = training_seconds  # the optimisation steps alone
        record["epoch_seconds"] = time.perf_counter() - started  # plus valid (and test) prediction, checkpoint
        state.history.append(record)
        state.epoch = epoch
        if on_epoch is not None:
            on_epoch(record, lambda directory: save_state(Path(directory), engine, state, order))
        if stop:
            break

    if state.best_score is None:
        raise MsaError(f"valid {selection} was NaN in every epoch; nothing to select")
    if writer is not None:
        writer.write_history(state.history)
    return TrainResult(
        out_dir=out_dir, best_epoch=state.best_epoch, selection_metric=selection,
        valid_metrics=state.best_valid, test_metrics=state.best_test, history=state.history,
        weights_sha256=writer.weights_sha256 if writer is not None else "",
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


def _full_state_dict(engine, config: TrainConfig) -> dict[str, torch.Tensor]:
    if config.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            return {k: v.clone() for k, v in engine.module.state_dict().items()}
    return engine.module.state_dict()


def verify_checkpoint_weights(folder: Path, what: str) -> Path:
    """The checkpoint's weights file, after checking it against the SHA-256 in its metrics.json.

    Raises:
        MsaError: missing weights or metadata, or a digest that differs (modified or corrupted).
    """
    try:
        stored = json.loads((folder / "metrics.json").read_text())
        expected = stored["weights_sha256"]
    except (OSError, ValueError, KeyError):
        raise MsaError(f"{what}: {folder} has no readable metrics.json with the weights' SHA-256") from None
    weights = folder / stored.get("weights_file", WEIGHTS_FILE)
    if not weights.is_file():
        raise MsaError(f"{what}: weights {weights} are missing")
    digest = sha256_path(weights)
    if digest != expected:
        raise MsaError(f"{what}: SHA-256 of {weights} is {digest[:16]}... but metrics.json recorded "
                       f"{expected[:16]}...; the checkpoint was modified or corrupted")
    return weights


def default_out_dir(config: TrainConfig, dataset: FeatureSet) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return Path("runs") / "train" / f"{config.model}-{dataset.name}-seed{config.seed}-{stamp}"


def prediction_table(split: Split, prediction: np.ndarray, class_names: tuple[str, ...]) -> tuple[list[str], list[list]]:
    """Header and rows of a predictions CSV: ``id,label,prediction`` (+ ``prob_<class>`` columns)."""
    if prediction.ndim == 1:
        return ["id", "label", "prediction"], [list(row) for row in zip(split.ids, split.labels.tolist(), prediction.tolist())]
    rows = [[clip, label, int(np.argmax(probs)), *probs]
            for clip, label, probs in zip(split.ids, split.labels.tolist(), prediction.tolist())]
    return ["id", "label", "prediction", *[f"prob_{c}" for c in class_names]], rows


def _write_predictions(path: Path, split: Split, prediction: np.ndarray, class_names: tuple[str, ...]) -> None:
    header, rows = prediction_table(split, prediction, class_names)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


class CheckpointWriter:
    """Rank 0's writer of the checkpoint folder. Each improvement replaces the whole folder
    atomically (built in a hidden sibling, then swapped in), so the folder always holds one
    complete best epoch, even if the run is stopped or killed later."""

    def __init__(self, out_dir: Path, config: TrainConfig, model, dataset: FeatureSet):
        self.out_dir, self.config, self.dataset = out_dir, config, dataset
        spec = dataset.spec
        self.resolved = {
            **to_plain(config),
            "model_config": to_plain(model.config),
            "data_spec": {"dims": spec.dims, "max_lengths": spec.max_lengths, "task": spec.task,
                          "num_classes": spec.num_classes, "class_names": list(dataset.class_names),
                          "metric_suite": dataset.metric_suite},
        }
        source = Path(dataset.source)
        self.fingerprint = dataset.fingerprint or (sha256_path(source) if source.exists() else None)
        self.weights_sha256 = ""
        if (out_dir / "metrics.json").is_file():  # a resumed run: keep the best epoch already written
            self.weights_sha256 = json.loads((out_dir / "metrics.json").read_text())["weights_sha256"]

    def write_best(self, weights, valid_pred, test_pred, state: LoopState, history) -> None:
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.out_dir.parent, prefix=f".{self.out_dir.name}.", suffix=".partial"))
        try:
            staging.chmod(0o755)  # mkdtemp makes it private; the published folder should not be
            torch.save(weights, staging / WEIGHTS_FILE)
            sha = sha256_path(staging / WEIGHTS_FILE)
            (staging / "config.yaml").write_text(yaml.safe_dump(self.resolved, sort_keys=False))
            classes = self.dataset.class_names
            _write_predictions(staging / "predictions_valid.csv", self.dataset.splits["valid"], valid_pred, classes)
            _write_predictions(staging / "predictions_test.csv", self.dataset.splits["test"], test_pred, classes)
            _write_history(staging / "history.csv", history)
            metrics = {
                "model": self.config.model, "dataset": self.dataset.name, "dataset_fingerprint": self.fingerprint,
                "seed": self.config.seed, "best_epoch": state.best_epoch,
                "selection_metric": self.config.selection_metric,
                "selection_mode": METRIC_MODES[self.config.selection_metric],
                "valid": state.best_valid, "test": state.best_test,
                "weights_file": WEIGHTS_FILE, "weights_sha256": sha,
            }
            (staging / "metrics.json").write_text(json.dumps(_finite_or_none(metrics), indent=2))
            _swap_in(staging, self.out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.weights_sha256 = sha

    def write_history(self, history: list[dict[str, float]]) -> None:
        """Replace history.csv with the whole run's history (the best epoch may not be the last)."""
        atomic_write(self.out_dir / "history.csv", lambda tmp: _write_history(tmp, history))


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def _swap_in(staging: Path, target: Path) -> None:
    """Rename `staging` onto `target`; an existing `target` is moved aside first, then removed."""
    if not target.exists():
        os.replace(staging, target)
        return
    retired = target.with_name(f".{target.name}.{os.getpid()}.old")
    os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN: undefined metrics are written as null."""
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
