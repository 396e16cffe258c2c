"""Layers shared by the models: masking and pooling over padded sequences, a small MLP, sinusoidal
positions, gradient reversal, and the mutual-information critics (FactorCL's concat critic) with
their InfoNCE and NCE-CLUB bounds.

Example:
    >>> import torch
    >>> masked_mean(torch.ones(2, 3, 4), torch.tensor([1, 3])).shape
    torch.Size([2, 4])
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn


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


def mlp(in_dim: int, hidden: int, out_dim: int, dropout: float = 0.0) -> nn.Sequential:
    """Linear -> GELU -> Dropout -> Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


def sinusoidal_positions(x: torch.Tensor) -> torch.Tensor:
    """The Transformer's sinusoidal position table for ``x: (B, T, d)``, shaped ``(T, d)`` (d even)."""
    length, d = x.shape[1], x.shape[2]
    position = torch.arange(length, device=x.device, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, d, 2, device=x.device, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(length, d, device=x.device)
    table[:, 0::2], table[:, 1::2] = torch.sin(position * frequency), torch.cos(position * frequency)
    return table.to(x.dtype)


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.strength * grad, None


class GradientReversal(nn.Module):
    """Identity forward; the gradient is multiplied by ``-strength`` on the way back (Ganin &
    Lempitsky, 2015), so what follows learns to discriminate and what precedes learns to fool it."""

    def __init__(self, strength: float = 1.0):
        super().__init__()
        self.strength = strength

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReverseGradient.apply(x, self.strength)


class ConcatCritic(nn.Module):
    """FactorCL's concat critic: ``f(x, y) = MLP([x; y])`` scored on every pair of a batch.

    ``scores(x, y)[i, j] = f(x_j, y_i)``: the diagonal holds the paired samples. One hidden ReLU
    layer as in FactorCL; no output bias, since both bounds are blind to a constant shift of all
    scores (the bias could never be trained). Scores are squashed to ``(-bound, bound)`` by
    ``bound * tanh(f / bound)``: an encoder minimising an NCE-CLUB estimate through the critic
    otherwise drives its scores without limit (measured: critic losses above 1e4 within 200 steps).
    """

    def __init__(self, x_dim: int, y_dim: int, hidden: int = 512, bound: float = 10.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(x_dim + y_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1, bias=False))
        self.bound = bound

    def scores(self, x: torch.Tensor, y: torch.Tensor, *, frozen: bool = False) -> torch.Tensor:
        """``(B, B)`` scores; `frozen` treats the critic's weights as constants (gradients reach x and y only)."""
        n = x.shape[0]
        pairs = torch.cat([x.unsqueeze(0).expand(n, n, -1), y.unsqueeze(1).expand(n, n, -1)], dim=-1)
        with _constant_parameters(self.net) if frozen else contextlib.nullcontext():
            raw = self.net(pairs)
        return self.bound * torch.tanh(raw.squeeze(-1) / self.bound)


@contextlib.contextmanager
def _constant_parameters(module: nn.Module) -> Iterator[None]:
    """Within the block, what `module` computes is differentiable in its inputs but not in its
    parameters: a stop-gradient on the weights that keeps the parameters themselves in place.

    Unlike calling the module with detached copies of its weights (``torch.func.functional_call``),
    the module runs with its own parameters, so DeepSpeed ZeRO-3 still gathers its partitioned
    weights before the forward and again before the backward that needs them."""
    trained = [p for p in module.parameters() if p.requires_grad]
    for p in trained:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trained:
            p.requires_grad_(True)


def infonce_lower_bound(scores: torch.Tensor) -> torch.Tensor:
    """InfoNCE lower bound on I(X; Y) from a ``(B, B)`` critic score matrix (diagonal = pairs)."""
    n = scores.shape[0]
    return scores.diagonal().mean() - (torch.logsumexp(scores, dim=1).mean() - math.log(n))


def nce_club_upper_bound(scores: torch.Tensor) -> torch.Tensor:
    """NCE-CLUB upper bound on I(X; Y): mean paired score minus mean score over all pairs."""
    return scores.diagonal().mean() - scores.mean()
