"""Baseline: per-modality masked mean-pool, a small MLP per modality, late fusion by concatenation.

The reference point every real model (FINE, invariant, DBR) must beat in a sweep. It has no
auxiliary losses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from msa.models.base import ModelOutput
from msa.models.layers import masked_mean
from msa.platform.core.spec import DataSpec


@dataclass
class BaselineConfig:
    """Hyperparameters of the baseline.

    Args:
        hidden: width of each modality encoder and of the fusion head.
        dropout: dropout before each linear layer of the head.
    """

    hidden: int = 64
    dropout: float = 0.1


class ModalityEncoder(nn.Module):
    """LayerNorm -> Linear -> GELU on a pooled modality vector."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU())

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled)


class BaselineModel(nn.Module):
    """Masked mean-pool each modality, encode it, concatenate, predict."""

    loss_weights: dict[str, float] = {}

    def __init__(self, spec: DataSpec, config: BaselineConfig):
        super().__init__()
        self.spec = spec
        self.config = config
        self.encoders = nn.ModuleDict(
            {m: ModalityEncoder(d, config.hidden) for m, d in spec.dims.items()}
        )
        fused_size = config.hidden * len(spec.dims)
        self.head = nn.Sequential(
            nn.Dropout(config.dropout),
            nn.Linear(fused_size, config.hidden),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, spec.output_size),
        )

    def forward(
        self,
        features: dict[str, torch.Tensor],
        lengths: dict[str, torch.Tensor],
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        encoded = [self.encoders[m](masked_mean(features[m], lengths[m])) for m in self.spec.modalities]
        fused = torch.cat(encoded, dim=-1)  # (B, hidden * M)
        out = self.head(fused)  # (B, output_size)
        prediction = out.squeeze(-1) if self.spec.task == "regression" else out
        return ModelOutput(prediction=prediction, fused=fused, aux_losses={})
