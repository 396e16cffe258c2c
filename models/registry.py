"""The single model registry: `msa models`, config validation and the shared model tests derive from `MODELS`.

Register a model by adding one `ModelEntry`; nothing else in the platform names models.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from msa.models.baseline import BaselineConfig, BaselineModel
from msa.models.dbr import DBRConfig, DBRModel
from msa.models.fine import FINEConfig, FINEModel
from msa.models.invariant import InvariantConfig, InvariantModel
from msa.models.tfn import TFNConfig, TFNModel
from msa.platform.core.config import build_dataclass
from msa.platform.core.errors import MsaError
from msa.platform.core.spec import DataSpec


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its module class, its config dataclass, one line about it, and the
    fewest modalities it accepts (a model takes any subset of the modalities with at least
    `min_modalities` of them; `require_modalities` holds every entry point to it)."""

    model_class: type[nn.Module]
    config_class: type
    summary: str
    min_modalities: int = 2

    def require_modalities(self, name: str, modalities: tuple[str, ...], *, what: str) -> None:
        """Refuse data with fewer modalities than the model needs (`what` names the data).

        Raises:
            MsaError: naming the model, its minimum and the data's modalities.
        """
        if len(modalities) < self.min_modalities:
            raise MsaError(f"model {name!r} needs at least {self.min_modalities} modalities but {what} has "
                           f"{len(modalities)} ({', '.join(modalities)}); use a model that takes fewer "
                           f"({', '.join(n for n, e in MODELS.items() if e.min_modalities <= len(modalities))})")


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


def build_model_config(name: str, model_config: dict[str, Any] | None = None, *, where: str = "") -> Any:
    """Model `name`'s config dataclass with `model_config` overriding its defaults."""
    return build_dataclass(get_entry(name).config_class, model_config or {}, where=where or f"model_config of {name!r}")


def build_model(name: str, spec: DataSpec, model_config: dict[str, Any] | None = None) -> nn.Module:
    """Build model `name` for `spec` with `model_config` overriding its config defaults."""
    return get_entry(name).model_class(spec, build_model_config(name, model_config))
