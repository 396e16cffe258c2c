"""What every rendering of a leaderboard document says the same way (`leaderboard.py`,
`board_html.py`, `board_latex.py`): numbers (finite or undefined), metric names as a reader
knows them, rounding per metric, the best value of each column, and the page's sentences."""
from __future__ import annotations

import math
from typing import Any

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


def seed_sd(row: dict, split: str, metric: str) -> float | None:
    """The standard deviation over a seed group's seeds of `metric` on `split` (None for a row
    without seeds)."""
    seeds = row.get("seeds") or {}
    return number((seeds.get(f"{split}_sd") or {}).get(metric))


def best_rows(entry: dict, split: str, metric: str) -> set[int]:
    """Positions of the rows holding the best `split` value of `metric` (ties all count)."""
    values = [number(row[split].get(metric)) for row in entry["rows"]]
    found = [v for v in values if v is not None]
    if not found:
        return set()
    best = min(found) if entry["directions"][metric] == "lower" else max(found)
    return {i for i, v in enumerate(values) if v == best}


def facts(board: dict) -> list[tuple[str, Any]]:
    return [("Run", board["run_dir"]), ("Protocol", board["protocol"]), ("Folds", board["folds"]),
            ("Created", board["created"]), ("Bootstrap resamples", board["bootstrap"])]


def legend(board: dict) -> str:
    return (f"↑ higher is better, ↓ lower is better. Δ is the row's test score minus the best single "
            f"model's on the selection metric, with its paired-bootstrap 95% interval "
            f"({board['bootstrap']} resamples) in brackets; an interval that excludes 0 is a difference "
            f"the bootstrap resolves. {MISSING} marks an undefined value.")


def intro(entry: dict) -> str:
    sel = entry["selection_metric"]
    direction = entry["directions"][sel]
    better = "negative" if direction == "lower" else "positive"
    return (f"Task {entry['task']} (metric suite {entry['metric_suite']}); ranked by valid {sel} "
            f"({direction} is better); best single model: {entry['best_single']}. "
            f"A {better} Δ{sel} beats the best single model.")
