"""Layers shared by the models: masking and pooling over padded sequences."""
from __future__ import annotations

import torch


def length_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """``(B, T)`` boolean mask, True on real steps, from ``(B,)`` lengths."""
    steps = torch.arange(max_length, device=lengths.device)
    return steps.unsqueeze(0) < lengths.unsqueeze(1)


def masked_mean(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean over the real steps of ``x: (B, T, d)``; a length-0 row pools to zeros."""
    mask = length_mask(lengths, x.shape[1]).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
    total = (x * mask).sum(dim=1)  # (B, d)
    count = mask.sum(dim=1).clamp(min=1.0)  # (B, 1)
    return total / count
