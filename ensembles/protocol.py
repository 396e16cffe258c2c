"""The honest protocol: what an ensemble is fitted on, how its valid score is estimated, and how
its test score is compared with the best single model.

* A meta-learner is fitted on valid (or out-of-fold) predictions only; `MetaLearner.fit` refuses
  a matrix whose split is test.
* Its valid score is cross-fitted: K folds over valid grouped by video, each fold predicted by a
  copy fitted on the other folds, so no valid clip is scored by a learner that saw it. An
  in-sample valid score would reward the learner for memorising valid.
* Test is scored once, after every learner is fitted (`score_test`), and every test difference
  against the best single model comes with a paired bootstrap 95% interval (the same resampled
  clips for both, so the interval reflects the difference, not the two models' own spreads).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from msa.ensembles.matrix import PredictionMatrix
from msa.ensembles.meta_learners import MetaLearner
from msa.platform.core.files import finite_or_none
from msa.platform.core.metrics import compute_metrics


@dataclass
class FittedEnsemble:
    """A meta-learner fitted on all of valid, with its cross-fitted valid predictions."""

    learner: MetaLearner
    valid_prediction: np.ndarray  # cross-fitted: each clip predicted by a learner that never saw it
    fit_seconds: float
    test_prediction: np.ndarray | None = None
    predict_seconds: float = math.nan


def cross_fit(learner: MetaLearner, valid: PredictionMatrix, folds: np.ndarray) -> np.ndarray:
    """Out-of-fold predictions for every valid row: fold j by a fresh copy fitted on the others."""
    shape = (len(valid),) + ((valid.predictions.shape[2],) if valid.task == "classification" else ())
    out = np.empty(shape)
    for fold in np.unique(folds):
        held_out = folds == fold
        copy = learner.fresh().fit(valid.subset(~held_out))
        out[held_out] = copy.predict(valid.predictions[held_out])
    return out


def fit_ensemble(learner: MetaLearner, valid: PredictionMatrix, folds: np.ndarray) -> FittedEnsemble:
    """Cross-fit for the valid estimate, then fit on all of valid (timed)."""
    valid_prediction = cross_fit(learner, valid, folds)
    started = time.perf_counter()
    learner.fit(valid)
    return FittedEnsemble(learner=learner, valid_prediction=valid_prediction, fit_seconds=time.perf_counter() - started)


def score_test(ensembles: list[FittedEnsemble], test: PredictionMatrix) -> None:
    """Predict test once per fitted ensemble (timed); call after every ensemble is fixed."""
    for ensemble in ensembles:
        started = time.perf_counter()
        ensemble.test_prediction = ensemble.learner.predict(test.predictions)
        ensemble.predict_seconds = time.perf_counter() - started


class PairedBootstrap:
    """Test differences against one reference prediction (the best single model), with paired
    bootstrap 95% intervals: every compared prediction is scored on the same `resamples` clip
    resamples as the reference, whose scores are computed once.

    Example:
        >>> truth = np.array([0.5, -1.0, 2.0, 0.0, 1.5, -0.5])
        >>> boot = PairedBootstrap("mosi", truth, truth + 0.5, resamples=200)  # the best single model: MAE 0.5
        >>> mae = boot.compare(truth + 0.25)["mae"]  # a prediction with MAE 0.25 on every resample
        >>> round(mae["diff"], 3), round(mae["low"], 3), round(mae["high"], 3)
        (-0.25, -0.25, -0.25)
    """

    def __init__(self, suite: str, truth: np.ndarray, reference: np.ndarray, *, resamples: int, seed: int = 0):
        self.suite, self.truth, self.reference = suite, truth, reference
        self.rows = np.random.default_rng(seed).integers(0, len(truth), (resamples, len(truth)))
        self.reference_full = compute_metrics(suite, reference, truth)
        self.reference_draws = [compute_metrics(suite, reference[rows], truth[rows]) for rows in self.rows]

    def compare(self, prediction: np.ndarray) -> dict[str, dict[str, float | None]]:
        """Per metric: ``metric(prediction) - metric(reference)`` on all clips and its interval
        (the 2.5 and 97.5 percentiles of the resampled differences)."""
        full = compute_metrics(self.suite, prediction, self.truth)
        if np.array_equal(prediction, self.reference):
            return {name: {"diff": 0.0, "low": 0.0, "high": 0.0} for name in full}
        draws = {name: [] for name in full}
        for rows, reference in zip(self.rows, self.reference_draws):
            for name, value in compute_metrics(self.suite, prediction[rows], self.truth[rows]).items():
                draws[name].append(value - reference[name])
        out = {}
        for name, value in full.items():
            values = np.asarray(draws[name], dtype=np.float64)
            values = values[np.isfinite(values)]
            low, high = np.percentile(values, [2.5, 97.5]) if len(values) else (math.nan, math.nan)
            out[name] = finite_or_none({"diff": value - self.reference_full[name], "low": float(low), "high": float(high)})
        return out


def finite_metrics(metrics: dict[str, float]) -> dict[str, float | None]:
    """Metrics with undefined (NaN) values as None, as the leaderboard stores them."""
    return finite_or_none({name: float(value) for name, value in metrics.items()})
