"""PNG plots logged to MLflow: a trial's learning curves, a study's optimisation history and
parameter importances; `pyplot` for every other figure (the leaderboard's chart).

Matplotlib with the Agg backend, so no display is needed. It is imported on the first plot, not
with this module: it costs about a second, and `msa leaderboard` imports this module for its
chart whatever format it renders.
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path


@functools.cache
def pyplot():
    """`matplotlib.pyplot` on the Agg backend (chosen before pyplot is first imported)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(curves: dict[str, list[tuple[int, float]]], selection_metric: str, out: Path) -> Path:
    """Train loss terms (left) and the valid selection metric (right) per epoch.

    `curves` maps a metric name (``train_loss``, ``valid_mae``, ...) to its (epoch, value) points."""
    figure, (losses, valid) = pyplot().subplots(1, 2, figsize=(10, 4))
    for name in sorted(k for k in curves if k.startswith("train_")):
        losses.plot(*zip(*curves[name]), marker="o", label=name.removeprefix("train_"))
    losses.set(xlabel="epoch", ylabel="train loss", title="training losses")
    losses.legend()
    for name, style in ((f"valid_{selection_metric}", "-"), (f"best_valid_{selection_metric}", "--")):
        if curves.get(name):
            valid.plot(*zip(*curves[name]), marker="o", linestyle=style, label=name)
    valid.set(xlabel="epoch", ylabel=selection_metric, title=f"valid {selection_metric}")
    valid.legend()
    return _save(figure, out)


def optimization_history(study, out: Path) -> Path:
    """Optuna's optimisation history (every trial's value and the best so far)."""
    from optuna.visualization.matplotlib import plot_optimization_history

    with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental
        warnings.simplefilter("ignore")
        axes = plot_optimization_history(study)
    return _save(axes.figure, out)


def param_importances(study, out: Path) -> Path:
    """Optuna's fANOVA parameter importances over the study's COMPLETE trials.

    Raises:
        ValueError: fewer than two complete trials, or no parameter that varied (Optuna's check).
    """
    from optuna.visualization.matplotlib import plot_param_importances

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = plot_param_importances(study)
    return _save(axes.figure, out)


def _save(figure, out: Path) -> Path:
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    pyplot().close(figure)
    return out
