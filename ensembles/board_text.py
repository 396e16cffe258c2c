"""What every rendering of a leaderboard (`board.Leaderboard`) says the same way
(`leaderboard.py`, `board_html.py`, `board_latex.py`, `board_console.py`): numbers (finite or
undefined), metric names as a reader knows them, rounding per metric, and the page's sentences."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # board.py reads `number` from here
    from msa.ensembles.board import DatasetBoard, Leaderboard

ARROWS = {"higher": "↑", "lower": "↓"}
MISSING = "–"
RANKING_SENTENCE = "Ranked by the valid selection metric; test is scored once, after everything is fixed."

# How papers and MMSA name the metrics of each suite.
METRIC_LABELS = {
    "acc2_has0": "Acc-2 (has0)", "f1_has0": "F1 (has0)", "acc2_non0": "Acc-2 (non0)", "f1_non0": "F1 (non0)",
    "acc2": "Acc-2", "acc3": "Acc-3", "acc5": "Acc-5", "acc7": "Acc-7", "f1": "F1", "mae": "MAE", "corr": "Corr",
    "acc": "Acc", "f1_macro": "F1 (macro)", "precision_macro": "Precision (macro)", "recall_macro": "Recall (macro)",
    "f1_weighted": "F1 (weighted)",
}
# Decimals a person reads: accuracies and F1 are percentages (one decimal), MAE and Corr lie
# around 1 (three).
THREE_DECIMALS = ("mae", "corr")


def number(value: Any) -> float | int | None:
    """A finite number, or None for None, NaN, infinities and anything that is not a number."""
    if value is None or isinstance(value, (bool, str)):
        return None
    if isinstance(value, int):
        return value
    try:
        found = float(value)
    except (TypeError, ValueError):
        return None
    return found if math.isfinite(found) else None


def unique(items) -> list:
    return list(dict.fromkeys(items))


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def decimals(metric: str) -> int:
    return 3 if metric in THREE_DECIMALS else 1


def rounded(metric: str, value: Any, *, signed: bool = False) -> str:
    """`value` rounded as `metric` is read (``MISSING`` when undefined); `signed` adds a + to
    positive differences."""
    found = number(value)
    if found is None:
        return MISSING
    return f"{found:{'+' if signed else ''}.{decimals(metric)}f}".replace("-", "−")


def facts(board: Leaderboard) -> list[tuple[str, Any]]:
    """The run facts a `Leaderboard` opens with, labelled."""
    return [("Run", board.run_dir), ("Protocol", board.protocol), ("Folds", board.folds),
            ("Created", board.created), ("Bootstrap resamples", board.bootstrap)]


def legend(board: Leaderboard) -> str:
    return (f"↑ higher is better, ↓ lower is better. Δ is the row's test score minus the best single "
            f"model's on the selection metric, with its paired-bootstrap 95% interval "
            f"({board.bootstrap} resamples) in brackets; an interval that excludes 0 is a difference "
            f"the bootstrap resolves. {MISSING} marks an undefined value.")


def intro(entry: DatasetBoard) -> str:
    """The sentence under a `DatasetBoard`'s heading."""
    sel = entry.selection_metric
    direction = entry.directions[sel]
    better = "negative" if direction == "lower" else "positive"
    return (f"Task {entry.task} (metric suite {entry.metric_suite}); ranked by valid {sel} "
            f"({direction} is better); best single model: {entry.best_single}. "
            f"A {better} Δ{sel} beats the best single model.")
