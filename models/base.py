"""The contract every model follows: what it is built from (`DataSpec`) and what it returns
(`ModelOutput`).

A model is an `nn.Module` built as `Model(spec, config)` whose forward takes per-modality padded
sequences and their lengths and returns a `ModelOutput`. The training loop adds
`task_loss + sum(model.loss_weights[k] * aux_losses[k])`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

MODALITIES = ("text", "audio", "vision")
TASKS = ("regression", "classification")


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about a dataset to be built.

    Args:
        dims: feature size per modality, in canonical order, e.g. ``{"text": 384, "audio": 73}``.
        max_lengths: padded sequence length per modality.
        task: ``"regression"`` (one score) or ``"classification"``.
        num_classes: number of classes (0 for regression).

    Example:
        >>> DataSpec(dims={"text": 8, "audio": 4}, max_lengths={"text": 5, "audio": 1},
        ...          task="regression", num_classes=0).output_size
        1
    """

    dims: dict[str, int]
    max_lengths: dict[str, int]
    task: str
    num_classes: int = 0

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.dims)

    @property
    def output_size(self) -> int:
        return self.num_classes if self.task == "classification" else 1


@dataclass
class ModelOutput:
    """What a forward pass returns.

    Args:
        prediction: ``(B,)`` regression scores or ``(B, C)`` class logits.
        fused: ``(B, h)`` the fused representation (used later by ensembles and analysis).
        aux_losses: named, unweighted auxiliary losses (scalars); empty for models without any.
    """

    prediction: torch.Tensor
    fused: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
