"""Evaluation metrics, exactly as MMSA defines them (its `MetricsTop`, golden-tested in the tests).

Three suites, chosen by the dataset's label scale:

* ``mosi`` (CMU-MOSI / CMU-MOSEI, labels in [-3, 3]):
  ``acc2_has0``/``f1_has0`` (truth >= 0 vs pred >= 0 over all samples), ``acc2_non0``/``f1_non0``
  (samples with truth == 0 dropped, then > 0 vs > 0), ``acc5`` (clip to [-2, 2], round, exact),
  ``acc7`` (clip to [-3, 3], round, exact), ``mae``, ``corr`` (Pearson).
* ``sims`` (CH-SIMS, labels in [-1, 1]): predictions and truth clipped to [-1, 1], then binned:
  ``acc2`` ([-1, 0] | (0, 1]), ``acc3`` ([-1, -0.1] | (-0.1, 0.1] | (0.1, 1]),
  ``acc5`` ([-1, -0.7] | (-0.7, -0.1] | (-0.1, 0.1] | (0.1, 0.7] | (0.7, 1]), ``f1`` (weighted, on
  the 2 bins), ``mae`` and ``corr`` on the clipped values.
* ``classification`` (MIntRec): ``acc``, ``f1_macro``, ``precision_macro``, ``recall_macro``,
  ``f1_weighted`` (per-class F1 averaged with the classes' true counts as weights, scikit-learn's
  ``average="weighted"``: on imbalanced intents it follows the frequent classes, where ``f1_macro``
  weighs every class alike).

Accuracies and F1 are percentages; MAE and Corr are raw. Rounding is numpy's (half to even), as in
MMSA. Undefined values: ``corr`` is 0.0 when either side is constant (no linear association can be
measured); the non0 metrics are NaN when every truth is 0 (there is no sample to score). F1,
precision and recall follow scikit-learn's definitions with ``zero_division=0``, over the labels
present in either truth or prediction; they are computed here in numpy so that a training worker
does not pay scikit-learn's import (1.1-1.8 s here, see benchmarks/RESULTS.md).
"""
from __future__ import annotations

import math

import numpy as np

SUITE_METRICS: dict[str, tuple[str, ...]] = {
    "mosi": ("acc2_has0", "f1_has0", "acc2_non0", "f1_non0", "acc5", "acc7", "mae", "corr"),
    "sims": ("acc2", "acc3", "acc5", "f1", "mae", "corr"),
    "classification": ("acc", "f1_macro", "precision_macro", "recall_macro", "f1_weighted"),
}

# Which direction is better for each metric (early stopping, selection): only MAE is minimised.
METRIC_MODES: dict[str, str] = {
    name: ("min" if name == "mae" else "max") for names in SUITE_METRICS.values() for name in names
}

DEFAULT_SELECTION_METRIC = {"mosi": "mae", "sims": "mae", "classification": "acc"}

SIMS_BINS = {
    "acc2": [-1.01, 0.0, 1.01],
    "acc3": [-1.01, -0.1, 0.1, 1.01],
    "acc5": [-1.01, -0.7, -0.1, 0.1, 0.7, 1.01],
}


def _label_counts(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per label present in either side: true positives, predicted count, true count."""
    labels = np.union1d(truth, pred)
    tp = np.array([np.sum((pred == c) & (truth == c)) for c in labels], dtype=np.float64)
    predicted = np.array([np.sum(pred == c) for c in labels], dtype=np.float64)
    actual = np.array([np.sum(truth == c) for c in labels], dtype=np.float64)
    return tp, predicted, actual


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def accuracy(truth: np.ndarray, pred: np.ndarray) -> float:
    """Percentage of exact matches."""
    return 100.0 * float(np.mean(np.asarray(truth) == np.asarray(pred)))


def weighted_f1(truth: np.ndarray, pred: np.ndarray) -> float:
    """F1 per label averaged with the labels' true counts as weights, as a percentage."""
    tp, predicted, actual = _label_counts(truth, pred)
    f1 = _safe_ratio(2 * tp, predicted + actual)
    return 100.0 * float(np.sum(f1 * actual) / np.sum(actual))


def macro_scores(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Unweighted means over labels of F1, precision and recall, as percentages."""
    tp, predicted, actual = _label_counts(truth, pred)
    return {
        "f1_macro": 100.0 * float(np.mean(_safe_ratio(2 * tp, predicted + actual))),
        "precision_macro": 100.0 * float(np.mean(_safe_ratio(tp, predicted))),
        "recall_macro": 100.0 * float(np.mean(_safe_ratio(tp, actual))),
    }


def pearson(pred: np.ndarray, truth: np.ndarray) -> float:
    """Pearson correlation; 0.0 when either vector is constant."""
    if np.ptp(pred) == 0 or np.ptp(truth) == 0:
        return 0.0
    return float(np.corrcoef(pred, truth)[0, 1])


def _rounded_accuracy(pred: np.ndarray, truth: np.ndarray, bound: float) -> float:
    clipped_pred = np.round(np.clip(pred, -bound, bound))
    clipped_truth = np.round(np.clip(truth, -bound, bound))
    return 100.0 * float(np.mean(clipped_pred == clipped_truth))


def mosi_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """MOSI/MOSEI regression metrics of predictions `pred` against labels `truth`, both ``(N,)``."""
    pred, truth = _as_float_vectors(pred, truth)
    has0_pred, has0_truth = pred >= 0, truth >= 0
    nonzero = truth != 0
    if nonzero.any():
        non0_pred, non0_truth = pred[nonzero] > 0, truth[nonzero] > 0
        acc2_non0 = accuracy(non0_truth, non0_pred)
        f1_non0 = weighted_f1(non0_truth, non0_pred)
    else:
        acc2_non0 = f1_non0 = math.nan
    return {
        "acc2_has0": accuracy(has0_truth, has0_pred),
        "f1_has0": weighted_f1(has0_truth, has0_pred),
        "acc2_non0": acc2_non0,
        "f1_non0": f1_non0,
        "acc5": _rounded_accuracy(pred, truth, 2.0),
        "acc7": _rounded_accuracy(pred, truth, 3.0),
        "mae": float(np.mean(np.abs(pred - truth))),
        "corr": pearson(pred, truth),
    }


def _sims_bin(values: np.ndarray, edges: list[float]) -> np.ndarray:
    """Bin index per value for half-open bins (lo, hi], compared in the values' own float type
    (as MMSA does: float32 -0.7 is the edge -0.7, not a value just above it)."""
    values = np.clip(np.asarray(values).reshape(-1), -1.0, 1.0)
    if values.dtype.kind != "f":
        values = values.astype(np.float64)
    return np.searchsorted(np.asarray(edges[1:-1], dtype=values.dtype), values, side="left")


def sims_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """CH-SIMS regression metrics; both sides are clipped to [-1, 1] first, as MMSA does."""
    clipped_pred, clipped_truth = (np.clip(v, -1.0, 1.0) for v in _as_float_vectors(pred, truth))
    scores: dict[str, float] = {}
    for name, edges in SIMS_BINS.items():
        scores[name] = 100.0 * float(np.mean(_sims_bin(pred, edges) == _sims_bin(truth, edges)))
    two_pred, two_truth = _sims_bin(pred, SIMS_BINS["acc2"]), _sims_bin(truth, SIMS_BINS["acc2"])
    scores["f1"] = weighted_f1(two_truth, two_pred)
    scores["mae"] = float(np.mean(np.abs(clipped_pred - clipped_truth)))
    scores["corr"] = pearson(clipped_pred, clipped_truth)
    return scores


def classification_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Accuracy, macro F1/precision/recall and weighted F1; `pred` is ``(N,)`` class ids or
    ``(N, C)`` scores."""
    pred = np.asarray(pred)
    if pred.ndim == 2:
        pred = pred.argmax(axis=1)
    truth = np.asarray(truth).astype(np.int64)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} does not match truth shape {truth.shape}")
    return {"acc": accuracy(truth, pred), **macro_scores(truth, pred), "f1_weighted": weighted_f1(truth, pred)}


_SUITE_FUNCTIONS = {"mosi": mosi_metrics, "sims": sims_metrics, "classification": classification_metrics}


def compute_metrics(suite: str, pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """All metrics of `suite` for `pred` against `truth`."""
    if suite not in _SUITE_FUNCTIONS:
        raise ValueError(f"unknown metric suite {suite!r}; known: {', '.join(SUITE_METRICS)}")
    return _SUITE_FUNCTIONS[suite](pred, truth)


def loss_of(metric: str, value: float | None) -> float:
    """`value` of `metric` as a loss (lower is better for every metric): the one place that
    knows a metric's direction. NaN and None are +inf, so an undefined score never wins.

    Example:
        >>> loss_of("mae", 0.7), loss_of("acc2_non0", 80.0), loss_of("corr", float("nan"))
        (0.7, -80.0, inf)
    """
    if value is None or math.isnan(value):
        return math.inf
    return float(value) if METRIC_MODES[metric] == "min" else -float(value)


def is_better(metric: str, candidate: float, incumbent: float | None) -> bool:
    """Whether `candidate` beats `incumbent` on `metric`; NaN never beats anything."""
    return loss_of(metric, candidate) < loss_of(metric, incumbent)


def best_of(metric: str, values: np.ndarray) -> float:
    """The best of `values` on `metric`, NaN ignored (NaN when every value is NaN)."""
    values = np.asarray(values, dtype=np.float64)
    if np.isnan(values).all():
        return math.nan
    return float(np.nanmin(values) if METRIC_MODES[metric] == "min" else np.nanmax(values))


def direction(metric: str) -> str:
    """``"lower"`` or ``"higher"``: which way `metric` is better, as the leaderboard says it."""
    return "lower" if METRIC_MODES[metric] == "min" else "higher"


def _as_float_vectors(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both as float64 ``(N,)``; a ``(N, 1)`` column is accepted, any other shape is an error."""
    vectors = []
    for name, value in (("prediction", pred), ("truth", truth)):
        value = np.asarray(value, dtype=np.float64)
        if value.ndim == 2 and value.shape[1] == 1:
            value = value[:, 0]
        if value.ndim != 1:
            raise ValueError(f"{name} must be (N,) or (N, 1), got shape {value.shape}")
        vectors.append(value)
    if vectors[0].shape != vectors[1].shape:
        raise ValueError(f"prediction shape {vectors[0].shape} does not match truth shape {vectors[1].shape}")
    return vectors[0], vectors[1]
