"""The contract every model follows: what it is built from (`DataSpec`) and what it returns
(`ModelOutput`).

A model is an `nn.Module` built as `Model(spec, config)` whose forward takes per-modality padded
sequences and their lengths and returns a `ModelOutput`. The training loop adds
`task_loss + sum(model.loss_weights[k] * aux_losses[k])`; `check_model_config` holds the checks
every model config shares (those weights, attention heads). `DataSpec` itself is `msa.platform.core.spec`'s.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from msa.platform.core.errors import MsaError


class ModelOutput(NamedTuple):
    """What a forward pass returns.

    A named tuple, not a dataclass: DeepSpeed's ZeRO-3 hooks find a module's output tensors only
    inside tuples, lists and dicts, and gather the parameters the module's own forward used (its
    direct parameters, and any it read from submodules outside their forward) for the backward
    only when the gradient reaches one of those tensors; hidden in a dataclass, the backward met
    released (empty) parameters.

    Args:
        prediction: ``(B,)`` regression scores or ``(B, C)`` class logits.
        fused: ``(B, h)`` the fused representation (used later by ensembles and analysis).
        aux_losses: named, unweighted auxiliary losses (scalars); empty for models without any.
    """

    prediction: torch.Tensor
    fused: torch.Tensor
    aux_losses: dict[str, torch.Tensor]


def check_model_config(config, model: str) -> None:
    """The checks every model config shares: no negative loss weight (a ``w_*`` field; it would
    maximise its loss instead of minimising it), and ``heads`` dividing the width ``d`` where a
    config has both.

    Raises:
        MsaError: naming the model and the field.
    """
    for name, value in vars(config).items():
        if name.startswith("w_") and value < 0:
            raise MsaError(f"{model}: {name} must be >= 0, got {value}")
    heads, width = getattr(config, "heads", None), getattr(config, "d", None)
    if heads is not None and width is not None and width % heads:
        raise MsaError(f"{model}: heads ({heads}) must divide d ({width})")
