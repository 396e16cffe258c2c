"""The vocabulary every layer shares: the modalities, the tasks, and `DataSpec`, what a model
needs to know about a dataset to be built.

It lives at the bottom (no torch) so that data readers, the sweep driver and the CLI can speak
of datasets without importing the models.
"""
from __future__ import annotations

from dataclasses import dataclass

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
