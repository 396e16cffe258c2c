"""The single model registry: CLI choices, docs and the shared model tests all derive from `MODELS`.

Register a model by adding one `ModelEntry`; nothing else in the platform names models.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from msa.models.base import DataSpec
from msa.models.baseline import BaselineConfig, BaselineModel
from msa.models.dbr import DBRConfig, DBRModel
from msa.models.fine import FINEConfig, FINEModel
from msa.models.invariant import InvariantConfig, InvariantModel
from msa.models.tfn import TFNConfig, TFNModel
from msa.platform.config import build_dataclass
from msa.platform.errors import MsaError


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its module class, its config dataclass, one line about it, and the
    fewest modalities it accepts (every model takes any subset of at least 2)."""

    model_class: type[nn.Module]
    config_class: type
    summary: str
    min_modalities: int = 2


MODELS: dict[str, ModelEntry] = {
    "baseline": ModelEntry(
        BaselineModel, BaselineConfig, "per-modality masked mean-pool + MLP late fusion",
        min_modalities=1,
    ),
    "tfn": ModelEntry(
        TFNModel, TFNConfig, "Tensor Fusion Network: outer-product fusion of per-modality vectors",
        min_modalities=1,
    ),
    "fine": ModelEntry(
        FINEModel, FINEConfig, "FINE: Mixture of Q-Formers, MI-factorised shared/unique codes, Dynamic Contrastive Queue",
        min_modalities=1,
    ),
    "invariant": ModelEntry(
        InvariantModel, InvariantConfig,
        "Invariant-guided fusion: adversarial + CMD shared codes gate cross-attention, sequential variation regularizer",
        min_modalities=2,
    ),
    "dbr": ModelEntry(
        DBRModel, DBRConfig,
        "DBR: decoupling stage with temporal-structural fusion, anchor-guided private routing, bidirectional fusion",
        min_modalities=2,
    ),
}


def get_entry(name: str) -> ModelEntry:
    """The registry entry for `name`, or an error listing the registered models."""
    if name not in MODELS:
        raise MsaError(f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def build_model(name: str, spec: DataSpec, model_config: dict[str, Any] | None = None) -> nn.Module:
    """Build model `name` for `spec` with `model_config` overriding its config defaults."""
    entry = get_entry(name)
    config = build_dataclass(entry.config_class, model_config or {}, where=f"model_config of {name!r}")
    return entry.model_class(spec, config)
