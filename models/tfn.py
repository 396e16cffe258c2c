"""TFN: Tensor Fusion Network (Zadeh et al., EMNLP 2017), as a second reference model.

A peer the real models must beat; MMSA 2.2.1's TFN reaches test MAE 0.929 on the mosi_lite
subset of CMU-MOSI (text + audio) that the benchmarks use. Per modality a subnetwork gives a vector: a
sequence modality (padded length > 1) goes through an LSTM read at its last real step, an
utterance-level modality (length 1) through an MLP. The vectors, each extended with a constant 1,
are fused by their outer product (unimodal, bimodal and trimodal interactions in one tensor),
flattened, and passed to a post-fusion MLP.

Reconstruction choices, one line each:
- [R] LSTM on every modality with more than one step (the paper: text only; MMSA: text only).
- [R] a length-0 row is read at step 1 (its zero padding) instead of failing.
- [R] post-fusion MLP of two hidden layers of `post_fusion_hidden`, dropout before each.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from msa.models.base import ModelOutput
from msa.platform.core.spec import DataSpec


@dataclass
class TFNConfig:
    """Hyperparameters of TFN.

    Args:
        hidden: size of each modality's vector before fusion (the fused tensor has
            (hidden + 1) ** M entries, so keep it small).
        post_fusion_hidden: width of the post-fusion MLP.
        dropout: dropout in the subnetworks and before each post-fusion layer.
    """

    hidden: int = 16
    post_fusion_hidden: int = 64
    dropout: float = 0.1


class SequenceSubnet(nn.Module):
    """LSTM over the real steps; the last real step's hidden state."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.lstm = nn.LSTM(dim, hidden, batch_first=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(self.norm(x), lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)  # h: (1, B, hidden)
        return self.dropout(h[0])


class UtteranceSubnet(nn.Module):
    """MLP on a single-step modality."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden), nn.ReLU())

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.net(x[:, 0])


class TFNModel(nn.Module):
    """Subnetworks -> outer-product tensor fusion -> post-fusion MLP."""

    loss_weights: dict[str, float] = {}

    def __init__(self, spec: DataSpec, config: TFNConfig):
        super().__init__()
        self.spec, self.config = spec, config
        self.subnets = nn.ModuleDict({
            m: (SequenceSubnet if spec.max_lengths[m] > 1 else UtteranceSubnet)(d, config.hidden, config.dropout)
            for m, d in spec.dims.items()
        })
        fused_size = (config.hidden + 1) ** len(spec.dims)
        width = config.post_fusion_hidden
        self.post_fusion = nn.Sequential(
            nn.Dropout(config.dropout), nn.Linear(fused_size, width), nn.ReLU(),
            nn.Dropout(config.dropout), nn.Linear(width, width), nn.ReLU(),
            nn.Linear(width, spec.output_size),
        )

    def forward(
        self,
        features: dict[str, torch.Tensor],
        lengths: dict[str, torch.Tensor],
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        fused = None
        for m in self.spec.modalities:
            z = self.subnets[m](features[m], lengths[m])  # (B, h)
            z = torch.cat([torch.ones_like(z[:, :1]), z], dim=-1)  # (B, h + 1)
            fused = z if fused is None else torch.einsum("bi,bj->bij", fused, z).flatten(1)
        out = self.post_fusion(fused)  # (B, output_size)
        prediction = out.squeeze(-1) if self.spec.task == "regression" else out
        return ModelOutput(prediction=prediction, fused=fused, aux_losses={})
