"""`TrainConfig`: every setting of one training run, validated; and the keys a sweep owns.

`msa train` builds it from YAML and ``key=value`` overrides; a sweep builds one per trial from
its fixed `train:` section, the search space's suggestion and `SWEEP_OWNED` keys it sets itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from msa.models.registry import get_entry
from msa.platform.core.config import build_dataclass
from msa.platform.core.errors import MsaError

# Train-config keys a sweep sets for every trial (from its budget, search, deepspeed sections
# and the trial's folder): neither its `train:` section nor a search space may name them, or
# Tune would merge the value over the sweep's own.
SWEEP_OWNED = ("model", "data", "out", "seed", "seeds", "epochs", "selection_metric", "zero_stage", "precision")


@dataclass
class TextEncoderConfig:
    """A Hugging Face text encoder inside the model, trained with it (`msa.platform.training.text_encoder`).

    Args:
        path: the encoder: a local Hugging Face model folder, ``pkg:<module>/<folder>`` (a folder
            inside an installed package), or a model id looked up in the local Hugging Face cache
            (downloads are off). Empty: no encoder, the data's text features are used.
        finetune: train the encoder; false freezes all of it (its output is then computed once).
        freeze_layers: k > 0 freezes the embeddings and the first k layers (0: nothing frozen).
        lr: the encoder's learning rate (its own parameter group; the model keeps ``lr``).
        layer_decay: layer i of n gets ``lr * layer_decay ** (n - 1 - i)`` (1: one rate).
        max_length: tokens per clip.
        gradient_checkpointing: recompute the encoder's activations in backward (less memory).
        prefix_cache: compute the frozen prefix's hidden states once per dataset and train only
            the layers above it (false: run the frozen layers in every step).
        cache_dir: the text cache's folder (token ids and prefixes, reused across runs); empty:
            ``$MSA_CACHE_DIR``, else ``~/.cache/msa-sweep/text`` (``$XDG_CACHE_HOME`` when set).
    """

    path: str = ""
    finetune: bool = True
    freeze_layers: int = 0
    lr: float = 5e-5
    layer_decay: float = 1.0
    max_length: int = 50
    gradient_checkpointing: bool = False
    prefix_cache: bool = True
    cache_dir: str = ""


@dataclass
class TrainConfig:
    """Everything one training run needs; loaded from YAML and ``key=value`` overrides.

    Args:
        model: a name from the model registry.
        data: path of the dataset (npz, MMSA pickle or MIntRec folder).
        out: output folder for the checkpoint; must not exist yet ("" picks one under runs/train).
        seed: seeds model initialisation and batch order; same seed, same result on CPU.
        seeds: n > 1 trains a seed group: the config with seeds ``seed`` .. ``seed + n - 1``, in
            lock-step epoch by epoch, each into ``out/seed-<seed>/`` (`train_seed_group`); each
            seed's run is the one ``seeds=1`` with that seed gives.
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
        text_encoder: a Hugging Face text encoder trained end to end in place of the text
            features (`TextEncoderConfig`; off unless ``text_encoder.path`` is set).
        inject_fault: reliability testing only (docs/reliability.md): ``raise`` makes every rank
            raise, ``kill`` makes the last rank SIGKILL its own process, at the start of epoch
            ``inject_fault_epoch`` of an attempt that did not resume from a checkpoint (so a
            retry from the last checkpoint goes past it); in a seed group, only in its last
            seed's epoch. ``none`` in real runs.
        inject_fault_epoch: the epoch at whose start ``inject_fault`` strikes.
    """

    model: str = "baseline"
    data: str = ""
    out: str = ""
    seed: int = 0
    seeds: int = 1
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
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    inject_fault: Literal["none", "raise", "kill"] = "none"
    inject_fault_epoch: int = 2


def resolve_config(config: TrainConfig | dict[str, Any], *, where: str = "train config") -> TrainConfig:
    """A validated `TrainConfig` (from a mapping if needed); raises MsaError naming `where`."""
    if isinstance(config, dict):
        config = build_dataclass(TrainConfig, config, where=where)
    get_entry(config.model)
    for name, low in (("seeds", 1), ("epochs", 1), ("batch_size", 1), ("patience", 1), ("inject_fault_epoch", 1)):
        if getattr(config, name) < low:
            raise MsaError(f"train config: {name} must be >= {low}, got {getattr(config, name)}")
    if config.lr <= 0:
        raise MsaError(f"train config: lr must be > 0, got {config.lr}")
    encoder = config.text_encoder
    if encoder.path:
        for name, low in (("freeze_layers", 0), ("max_length", 2)):
            if getattr(encoder, name) < low:
                raise MsaError(f"train config: text_encoder.{name} must be >= {low}, got {getattr(encoder, name)}")
        if encoder.lr <= 0:
            raise MsaError(f"train config: text_encoder.lr must be > 0, got {encoder.lr}")
        if not 0 < encoder.layer_decay <= 1:
            raise MsaError(f"train config: text_encoder.layer_decay must lie in (0, 1], got {encoder.layer_decay}")
    if not config.data:
        raise MsaError("train config: no data path given (--data PATH or data: in the config)")
    return config

