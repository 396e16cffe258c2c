"""The honest protocol: cross-fitted valid estimates, test scored by a learner fitted elsewhere,
and paired bootstrap intervals."""
from __future__ import annotations

import numpy as np
import pytest

from msa.ensembles.folds import grouped_folds
from msa.ensembles.matrix import PredictionMatrix
from msa.ensembles.meta_learners import TestSplitError, make_meta_learner
from msa.ensembles.protocol import PairedBootstrap, cross_fit, fit_ensemble, score_test
from msa.platform.core.metrics import compute_metrics


def regression_matrix(split: str, n: int, members: int, seed: int, *, useful: int = 2) -> PredictionMatrix:
    """`useful` members are truth + noise, the rest pure noise; ids come 4 clips per video."""
    rng = np.random.default_rng(seed)
    truth = rng.uniform(-3, 3, n)
    columns = [truth + rng.normal(0, 0.7, n) for _ in range(useful)]
    columns += [rng.normal(0, 1.5, n) for _ in range(members - useful)]
    return PredictionMatrix(split=split, ids=tuple(f"v{i // 4}_{i % 4}" for i in range(n)), labels=truth,
                            predictions=np.stack(columns, axis=1), members=tuple(f"m{j}" for j in range(members)),
                            task="regression")


def test_cross_fitted_estimate_is_not_the_flattering_in_sample_fit():
    # 25 members, 23 of them noise, on 80 clips: a weakly regularised linear stacker memorises valid.
    valid = regression_matrix("valid", 80, 25, seed=0)
    folds = grouped_folds(valid.ids, 5)
    learner = make_meta_learner("ridge", task="regression", suite="mosi", metric="mae", alpha=1e-6)
    in_sample = compute_metrics("mosi", learner.fresh().fit(valid).predict(valid.predictions), valid.labels)["mae"]
    crossed = compute_metrics("mosi", cross_fit(learner, valid, folds), valid.labels)["mae"]
    unseen = regression_matrix("holdout", 4000, 25, seed=1)
    fitted = learner.fresh().fit(valid)
    fresh_data = compute_metrics("mosi", fitted.predict(unseen.predictions), unseen.labels)["mae"]
    assert in_sample < crossed
    # The cross-fitted number is the closer of the two to what new clips actually give.
    assert abs(crossed - fresh_data) < abs(in_sample - fresh_data)


def test_cross_fit_predicts_each_row_by_a_learner_that_never_saw_it():
    valid = regression_matrix("valid", 60, 3, seed=2)
    folds = grouped_folds(valid.ids, 3)
    learner = make_meta_learner("nnls", task="regression", suite="mosi", metric="mae")
    oof = cross_fit(learner, valid, folds)
    for fold in range(3):
        held = folds == fold
        alone = learner.fresh().fit(valid.subset(~held)).predict(valid.predictions[held])
        assert np.allclose(oof[held], alone)


def test_test_is_never_fitted_on_and_is_scored_after_fitting():
    valid, test = regression_matrix("valid", 60, 3, seed=3), regression_matrix("test", 60, 3, seed=4)
    folds = grouped_folds(valid.ids, 3)
    ensembles = [fit_ensemble(make_meta_learner(name, task="regression", suite="mosi", metric="mae"), valid, folds)
                 for name in ("mean", "nnls", "ridge", "caruana")]
    assert all(e.test_prediction is None for e in ensembles)
    score_test(ensembles, test)
    for ensemble in ensembles:
        assert ensemble.test_prediction.shape == (60,)
        assert ensemble.predict_seconds >= 0
    with pytest.raises(TestSplitError):
        fit_ensemble(make_meta_learner("mean", task="regression", suite="mosi", metric="mae"), test, folds)


def test_paired_bootstrap_difference_and_interval():
    rng = np.random.default_rng(0)
    truth = rng.uniform(-3, 3, 500)
    reference = truth + rng.normal(0, 1.0, 500)
    better = truth + rng.normal(0, 0.3, 500)
    boot = PairedBootstrap("mosi", truth, reference, resamples=300, seed=0)
    same = boot.compare(reference.copy())
    assert same["mae"] == {"diff": 0.0, "low": 0.0, "high": 0.0}
    result = boot.compare(better)
    expected = compute_metrics("mosi", better, truth)["mae"] - compute_metrics("mosi", reference, truth)["mae"]
    assert result["mae"]["diff"] == pytest.approx(expected)
    assert result["mae"]["low"] <= result["mae"]["diff"] <= result["mae"]["high"] < 0  # clearly better: excludes 0
    assert result["corr"]["low"] > 0
    # A prediction no better than the reference: the interval straddles zero.
    other = truth + rng.normal(0, 1.0, 500)
    assert boot.compare(other)["mae"]["low"] < 0 < boot.compare(other)["mae"]["high"]
    assert boot.compare(better) == result  # the same resamples every time


def test_paired_bootstrap_undefined_metric_is_none():
    truth = np.zeros(50)  # every label 0: the non0 metrics are undefined
    rng = np.random.default_rng(1)
    boot = PairedBootstrap("mosi", truth, rng.normal(0, 1, 50), resamples=100)
    result = boot.compare(rng.normal(0, 1, 50))
    assert result["acc2_non0"] == {"diff": None, "low": None, "high": None}
    assert result["mae"]["diff"] is not None
