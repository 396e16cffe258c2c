"""Golden tests for ``msa.platform.core.metrics`` (MMSA ``metricsTop.py`` definitions).

Every expected value below was worked out by hand from small vectors and is written as a literal,
with the arithmetic in a comment; nothing is recomputed with sklearn/numpy on the same inputs.
Covered: the MOSI/MOSEI suite (has0/non0 ties at zero, all-zero labels, clipping, half-to-even
rounding, weighted F1, Pearson), the CH-SIMS suite (half-open bins and their edges, clipping to
[-1, 1]), the classification suite ((N,) ids vs (N, C) scores, zero_division=0, weighted vs macro
F1 on unequal supports, a sweep searching on weighted F1), suite dispatch and metric names/order,
shape checks, and ``is_better``.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from msa.platform.core.metrics import (
    METRIC_MODES,
    SUITE_METRICS,
    best_of,
    classification_metrics,
    compute_metrics,
    direction,
    is_better,
    loss_of,
    mosi_metrics,
    sims_metrics,
)

TOL = 1e-6


def _check(result: dict[str, float], expected: dict[str, float]) -> None:
    """Each expected metric matches; NaN expectations must be NaN."""
    for name, value in expected.items():
        if math.isnan(value):
            assert math.isnan(result[name]), f"{name}: expected NaN, got {result[name]}"
        else:
            assert result[name] == pytest.approx(value, abs=TOL), name


def _arr(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# MOSI / MOSEI
# --------------------------------------------------------------------------------------------------


def test_mosi_ties_at_zero_golden():
    pred = _arr([0.0, 0.0, 1.0, -1.0, 2.0, -0.5])
    truth = _arr([0.0, 1.0, 0.0, -2.0, 1.0, 0.5])
    # has0: truth>=0 -> [T,T,T,F,T,T]; pred>=0 -> [T,T,T,F,T,F] (pred 0 and truth 0 are positive)
    #   matches 5/6 = 83.3333
    #   class T (support 5): TP=4 FP=0 FN=1 -> P=1, R=4/5, F1=8/9
    #   class F (support 1): TP=1 FP=1 FN=0 -> P=1/2, R=1, F1=2/3
    #   weighted = (5*8/9 + 1*2/3) / 6 = 46/54 = 23/27 = 85.185185
    # non0: drop truth==0 (idx 0, 2); truth [1,-2,1,0.5] > 0 -> [T,F,T,T];
    #   pred [0,-1,2,-0.5] > 0 -> [F,F,T,F] (pred exactly 0 is negative here)
    #   matches 2/4 = 50
    #   class T (support 3): TP=1 FP=0 FN=2 -> P=1, R=1/3, F1=1/2
    #   class F (support 1): TP=1 FP=2 FN=0 -> P=1/3, R=1, F1=1/2
    #   weighted = 1/2 = 50
    # acc5/acc7: round pred [0,0,1,-1,2,-0] vs truth [0,1,0,-2,1,0] -> idx 0 and 5 match: 2/6
    # mae: (0 + 1 + 1 + 1 + 1 + 1) / 6 = 5/6
    _check(
        mosi_metrics(pred, truth),
        {
            "acc2_has0": 500 / 6,
            "f1_has0": 85.18518518518519,
            "acc2_non0": 50.0,
            "f1_non0": 50.0,
            "acc5": 200 / 6,
            "acc7": 200 / 6,
            "mae": 5 / 6,
        },
    )


@pytest.mark.parametrize(
    ("pred", "truth", "has0", "non0"),
    [
        (0.0, 0.0, 100.0, math.nan),  # both >= 0; the only sample is dropped for non0
        (0.0, 1.0, 100.0, 0.0),  # pred 0 is positive for has0, negative (not > 0) for non0
        (-0.0, 0.5, 100.0, 0.0),  # negative zero behaves like zero
        (0.0, -1.0, 0.0, 100.0),  # pred 0 >= 0 but truth < 0; for non0 both are "not > 0"
        (1.0, 0.0, 100.0, math.nan),  # truth 0 is positive for has0
        (-1.0, 0.0, 0.0, math.nan),
    ],
)
def test_mosi_single_sample_zero_conventions(pred, truth, has0, non0):
    _check(mosi_metrics(_arr([pred]), _arr([truth])), {"acc2_has0": has0, "acc2_non0": non0})


def test_mosi_all_zero_labels_nan_non0_and_zero_corr():
    pred = _arr([0.5, -1.0, 0.0, 2.0])
    truth = _arr([0.0, 0.0, 0.0, 0.0])
    # has0: truth all T; pred>=0 -> [T,F,T,T]: 3/4 = 75
    #   class T (support 4): TP=3 FP=0 FN=1 -> P=1, R=3/4, F1=6/7; class F has support 0 (weight 0)
    #   weighted = 6/7 = 85.714286
    # non0: no sample left -> NaN
    # acc5/acc7: round pred [0,-1,0,2] vs [0,0,0,0] -> 2/4 = 50 (round(0.5) = 0)
    # mae: (0.5 + 1 + 0 + 2) / 4 = 0.875; corr: truth constant -> 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from corrcoef, no sklearn warning
        result = mosi_metrics(pred, truth)
    _check(
        result,
        {
            "acc2_has0": 75.0,
            "f1_has0": 85.71428571428571,
            "acc2_non0": math.nan,
            "f1_non0": math.nan,
            "acc5": 50.0,
            "acc7": 50.0,
            "mae": 0.875,
            "corr": 0.0,
        },
    )


def test_mosi_constant_prediction_golden():
    pred = _arr([0.5, 0.5, 0.5, 0.5])
    truth = _arr([-1.0, 0.0, 1.0, 2.0])
    # has0: pred all T; truth>=0 -> [F,T,T,T]: 3/4 = 75
    #   class T (support 3): TP=3 FP=1 FN=0 -> P=3/4, R=1, F1=6/7
    #   class F (support 1): never predicted -> P=0 (zero_division), R=0, F1=0
    #   weighted = (3*6/7 + 0) / 4 = 9/14 = 64.285714
    # non0: drop truth 0 -> truth [-1,1,2] > 0 = [F,T,T], pred all T: 2/3 = 66.666667
    #   class T (support 2): TP=2 FP=1 -> P=2/3, R=1, F1=4/5; class F: F1=0
    #   weighted = (2*4/5) / 3 = 8/15 = 53.333333
    # acc5/acc7: round(0.5)=0 everywhere vs [-1,0,1,2] -> 1/4 = 25
    # mae: (1.5 + 0.5 + 0.5 + 1.5) / 4 = 1.0; corr: pred constant -> 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = mosi_metrics(pred, truth)
    _check(
        result,
        {
            "acc2_has0": 75.0,
            "f1_has0": 64.28571428571429,
            "acc2_non0": 200 / 3,
            "f1_non0": 53.333333333333336,
            "acc5": 25.0,
            "acc7": 25.0,
            "mae": 1.0,
            "corr": 0.0,
        },
    )


def test_mosi_weighted_f1_unbalanced_golden():
    truth = _arr([1, 1, 1, 1, 1, 1, -1, -1])  # 6 positive, 2 negative
    pred = _arr([1, 1, 1, 1, -1, -1, -1, 1])
    # matches: idx 0-3 and 6 -> 5/8 = 62.5 (no zeros, so has0 == non0)
    # class pos (support 6): TP=4 FP=1 FN=2 -> P=4/5, R=2/3, F1=2*(8/15)/(22/15)=8/11
    # class neg (support 2): TP=1 FP=2 FN=1 -> P=1/3, R=1/2, F1=2*(1/6)/(5/6)=2/5
    # weighted = (6*8/11 + 2*2/5) / 8 = (48/11 + 4/5) / 8 = 71/110 = 64.545454...
    # (macro would be (8/11 + 2/5)/2 = 56.36, so this pins the weighting)
    # mae: three misses of size 2 -> 6/8 = 0.75
    # corr: mean t = 0.5, mean p = 0.25, E[pt] = 2/8 -> cov = 0.25 - 0.125 = 0.125;
    #   var t = 1 - 0.25 = 0.75, var p = 1 - 0.0625 = 0.9375 -> 0.125/sqrt(45/64) = 1/sqrt(45)
    _check(
        mosi_metrics(pred, truth),
        {
            "acc2_has0": 62.5,
            "f1_has0": 64.54545454545455,
            "acc2_non0": 62.5,
            "f1_non0": 64.54545454545455,
            "acc5": 62.5,
            "acc7": 62.5,
            "mae": 0.75,
            "corr": 0.14907119849998599,
        },
    )


@pytest.mark.parametrize(
    ("truth", "acc5", "acc7"),
    [
        # np.round is half to even: 0.5->0, 1.5->2, 2.5->2, -0.5->-0 (== 0), -1.5->-2, -2.5->-2
        ([0.0, 2.0, 2.0, 0.0, -2.0, -2.0], 100.0, 100.0),
        # half-away-from-zero targets: every pred misses for acc7 (6 * miss = 0);
        # for acc5 truth 3/-3 clips to 2/-2 and pred 2.5/-2.5 clips to 2/-2 -> 2/6 match
        ([1.0, 1.0, 3.0, -1.0, -1.0, -3.0], 200 / 6, 0.0),
    ],
)
def test_mosi_rounding_is_half_to_even(truth, acc5, acc7):
    pred = _arr([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    _check(mosi_metrics(pred, _arr(truth)), {"acc5": acc5, "acc7": acc7})


def test_mosi_clipping_beyond_bounds_golden():
    pred = _arr([3.7, -4.0, 2.6, -2.4, 10.0, 1.2])
    truth = _arr([3.0, -3.0, 3.0, -2.0, 2.0, 1.0])
    # acc7: clip pred to [-3,3] -> [3,-3,2.6,-2.4,3,1.2] -> round [3,-3,3,-2,3,1]
    #   truth round [3,-3,3,-2,2,1] -> only idx 4 misses: 5/6 = 83.333333
    #   (without clipping 3.7 -> 4 and -4 would also miss)
    # acc5: clip pred to [-2,2] -> round [2,-2,2,-2,2,1]; truth clipped [2,-2,2,-2,2,1] -> 6/6
    # mae on the raw values: (0.7 + 1 + 0.4 + 0.4 + 8 + 0.2) / 6 = 10.7/6 = 1.783333
    _check(
        mosi_metrics(pred, truth),
        {"acc5": 100.0, "acc7": 500 / 6, "mae": 1.7833333333333332},
    )


@pytest.mark.parametrize(
    ("truth", "corr"),
    [
        # pred dev [-1.5,-.5,.5,1.5], truth dev [-1.5,.5,-.5,1.5]: sum dp*dt = 4, sum dp^2 = 5 -> 0.8
        ([1.0, 3.0, 2.0, 4.0], 0.8),
        ([4.0, 3.0, 2.0, 1.0], -1.0),  # perfectly reversed
        ([2.0, 4.0, 6.0, 8.0], 1.0),  # affine map of pred
    ],
)
def test_mosi_pearson_corr_golden(truth, corr):
    assert mosi_metrics(_arr([1.0, 2.0, 3.0, 4.0]), _arr(truth))["corr"] == pytest.approx(corr, abs=TOL)


def test_mosi_flattens_column_predictions():
    # (N, 1) predictions (a regression head's output) are read as (N,)
    pred = _arr([[0.5], [-1.0], [2.0], [0.0]])
    truth = _arr([1.0, -1.0, 2.0, -0.5])
    # has0: pred>=0 [T,F,T,T], truth>=0 [T,F,T,F] -> 3/4; mae (0.5 + 0 + 0 + 0.5)/4 = 0.25
    _check(mosi_metrics(pred, truth), {"acc2_has0": 75.0, "mae": 0.25})


# --------------------------------------------------------------------------------------------------
# CH-SIMS
# --------------------------------------------------------------------------------------------------


def test_sims_golden_vector():
    pred = _arr([-1.5, -0.7, -0.1, 0.0, 0.1, 0.7, 1.3])
    truth = _arr([-1.0, -0.5, 0.2, 0.0, 0.4, 0.6, 2.0])
    # clipped pred  [-1, -0.7, -0.1, 0, 0.1, 0.7, 1]; clipped truth [-1, -0.5, 0.2, 0, 0.4, 0.6, 1]
    # acc5 bins [-1,-.7] (-.7,-.1] (-.1,.1] (.1,.7] (.7,1]:
    #   pred [0,0,1,2,2,3,4], truth [0,1,3,2,3,3,4] -> idx 0,3,5,6 match: 4/7 = 57.142857
    # acc3 bins [-1,-.1] (-.1,.1] (.1,1]:
    #   pred [0,0,0,1,1,2,2], truth [0,0,2,1,2,2,2] -> idx 2,4 miss: 5/7 = 71.428571
    # acc2 bins [-1,0] (0,1]:
    #   pred [0,0,0,0,1,1,1], truth [0,0,1,0,1,1,1] -> idx 2 misses: 6/7 = 85.714286
    # f1 (weighted, 2 bins): class 0 (support 3): TP=3 FP=1 FN=0 -> F1=6/7;
    #   class 1 (support 4): TP=3 FP=0 FN=1 -> F1=6/7; weighted = 6/7 = 85.714286
    # mae on clipped: (0 + .2 + .3 + 0 + .3 + .1 + 0) / 7 = 0.9/7 = 0.128571 (raw would add 0.7+0.5)
    # corr on clipped: mean p = 0, mean t = 0.1; sum p*t = 2.79, sum p^2 = 3.0,
    #   sum (t - 0.1)^2 = 2.81 - 7*0.01 = 2.74 -> 2.79 / sqrt(3.0 * 2.74) = 0.973124
    _check(
        sims_metrics(pred, truth),
        {
            "acc2": 600 / 7,
            "acc3": 500 / 7,
            "acc5": 400 / 7,
            "f1": 600 / 7,
            "mae": 0.1285714285714286,
            "corr": 0.9731242484491424,
        },
    )


@pytest.mark.parametrize(
    ("metric", "value", "same_bin", "next_bin"),
    [
        # bins are half-open (lo, hi]: each edge value belongs to the bin BELOW it
        ("acc2", 0.0, -0.5, 0.05),  # 0 in [-1, 0]
        ("acc3", -0.1, -0.5, -0.05),  # -0.1 in [-1, -0.1]
        ("acc3", 0.0, 0.05, -0.5),  # 0 in (-0.1, 0.1]
        ("acc3", 0.1, 0.0, 0.2),  # 0.1 in (-0.1, 0.1]
        ("acc5", -0.7, -0.9, -0.6),  # -0.7 in [-1, -0.7]
        ("acc5", -0.1, -0.3, 0.0),  # -0.1 in (-0.7, -0.1]
        ("acc5", 0.0, -0.05, 0.2),  # 0 in (-0.1, 0.1]
        ("acc5", 0.1, 0.0, 0.2),  # 0.1 in (-0.1, 0.1]
        ("acc5", 0.7, 0.5, 0.8),  # 0.7 in (0.1, 0.7]
        # beyond +-1: clipped to the extreme bins
        ("acc5", 1.3, 0.8, 0.6),  # 1.3 -> 1 in (0.7, 1]
        ("acc5", -1.5, -1.0, -0.6),  # -1.5 -> -1 in [-1, -0.7]
        ("acc5", 5.0, 1.0, 0.7),
        ("acc2", -7.0, -1.0, 0.5),
    ],
)
def test_sims_bin_edges(metric, value, same_bin, next_bin):
    assert sims_metrics(_arr([value]), _arr([same_bin]))[metric] == pytest.approx(100.0, abs=TOL)
    assert sims_metrics(_arr([value]), _arr([next_bin]))[metric] == pytest.approx(0.0, abs=TOL)
    # symmetric: the edge value as truth lands in the same bin
    assert sims_metrics(_arr([same_bin]), _arr([value]))[metric] == pytest.approx(100.0, abs=TOL)


def test_sims_truth_beyond_one_is_clipped():
    # truth 3.0 and -2.0 clip to 1 and -1; mae on clipped = (|1 - 1| + |-1 - (-1)|) / 2 = 0
    result = sims_metrics(_arr([1.0, -1.0]), _arr([3.0, -2.0]))
    _check(result, {"acc2": 100.0, "acc3": 100.0, "acc5": 100.0, "f1": 100.0, "mae": 0.0, "corr": 1.0})


def test_sims_constant_prediction_corr_zero():
    # pred 0.5 everywhere; truth [-1, -0.5, 0.5, 1]
    # acc2: pred all bin 1; truth bins [0,0,1,1] -> 2/4 = 50
    # f1: class 1 (support 2): TP=2 FP=2 -> P=1/2, R=1, F1=2/3; class 0: F1=0 -> weighted 1/3
    # mae: (1.5 + 1 + 0 + 0.5) / 4 = 0.75; corr 0.0 (constant pred)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = sims_metrics(_arr([0.5] * 4), _arr([-1.0, -0.5, 0.5, 1.0]))
    _check(result, {"acc2": 50.0, "f1": 100 / 3, "mae": 0.75, "corr": 0.0})


# --------------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------------

CLS_TRUTH = np.array([0, 0, 1, 1, 2, 2])
CLS_IDS = np.array([0, 0, 0, 1, 1, 1])  # class 2 is never predicted
CLS_SCORES = np.array(  # row-wise argmax == CLS_IDS
    [
        [0.9, 0.05, 0.05],
        [2.0, 1.0, 0.0],
        [0.5, 0.3, 0.2],
        [0.1, 0.8, 0.1],
        [-1.0, 3.0, 2.0],
        [0.2, 0.5, 0.3],
    ]
)
# class 0: TP=2 FP=1 FN=0 -> P=2/3, R=1,   F1=4/5
# class 1: TP=1 FP=2 FN=1 -> P=1/3, R=1/2, F1=2/5
# class 2: TP=0 FP=0 FN=2 -> P=0 (zero_division=0), R=0, F1=0
# acc 3/6 = 50; P_macro = (2/3 + 1/3 + 0)/3 = 1/3; R_macro = (1 + 1/2 + 0)/3 = 1/2;
# F1_macro = (4/5 + 2/5 + 0)/3 = 2/5; every class has 2 samples, so F1_weighted = F1_macro
CLS_EXPECTED = {"acc": 50.0, "f1_macro": 40.0, "precision_macro": 100 / 3, "recall_macro": 50.0, "f1_weighted": 40.0}


@pytest.mark.parametrize("pred", [CLS_IDS, CLS_SCORES], ids=["class_ids", "scores"])
def test_classification_golden_with_unpredicted_class(pred):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zero_division=0 is explicit: no UndefinedMetricWarning
        result = classification_metrics(pred, CLS_TRUTH)
    _check(result, CLS_EXPECTED)


def test_classification_ids_and_scores_agree_exactly():
    assert classification_metrics(CLS_IDS, CLS_TRUTH) == classification_metrics(CLS_SCORES, CLS_TRUTH)


def test_classification_predicted_class_absent_from_truth():
    # truth [0,0,1,1], pred [0,2,1,1]: labels are the union {0,1,2}
    # class 0: TP=1 FP=0 FN=1 -> P=1, R=1/2, F1=2/3
    # class 1: TP=2 FP=0 FN=0 -> P=1, R=1,   F1=1
    # class 2: TP=0 FP=1 FN=0 -> P=0, R=0 (zero_division), F1=0
    # acc 3/4; P_macro = 2/3; R_macro = 1/2; F1_macro = (2/3 + 1)/3 = 5/9
    # F1_weighted = (2/3 * 2 + 1 * 2 + 0 * 0)/4 = 5/6 (class 2 has no sample: weight 0)
    result = classification_metrics(np.array([0, 2, 1, 1]), np.array([0, 0, 1, 1]))
    _check(
        result,
        {"acc": 75.0, "f1_macro": 55.55555555555556, "precision_macro": 200 / 3, "recall_macro": 50.0,
         "f1_weighted": 250 / 3},
    )


def test_classification_weighted_f1_with_unequal_supports():
    # truth: class 0 x6, class 1 x2, class 2 x2
    # class 0: pred 0 at 0-3, 9 -> TP=4 FP=1 FN=2 -> P=4/5, R=4/6, F1=2*4/(5+6)=8/11
    # class 1: pred 1 at 4-6    -> TP=1 FP=2 FN=1 -> P=1/3, R=1/2, F1=2*1/(3+2)=2/5
    # class 2: pred 2 at 7-8    -> TP=1 FP=1 FN=1 -> P=1/2, R=1/2, F1=2*1/(2+2)=1/2
    # acc 6/10; F1_macro = (8/11 + 2/5 + 1/2)/3 = 179/330;
    # F1_weighted = (6 * 8/11 + 2 * 2/5 + 2 * 1/2)/10 = 339/550, above macro: the big class scores best
    truth = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 0])
    _check(
        classification_metrics(pred, truth),
        {"acc": 60.0, "f1_macro": 100 * 179 / 330, "precision_macro": 100 * 49 / 90, "recall_macro": 100 * 5 / 9,
         "f1_weighted": 100 * 339 / 550},
    )


def test_a_sweep_can_search_on_weighted_f1(tmp_path):
    from helpers import sweep_config

    from msa.platform.core.errors import MsaError

    config = sweep_config(tmp_path, datasets=["synth_classification"], search={"metric": "f1_weighted", "mode": "max"})
    assert config.selection_metric("classification") == "f1_weighted"
    assert METRIC_MODES["f1_weighted"] == "max" and direction("f1_weighted") == "higher"
    with pytest.raises(MsaError, match="contradicts f1_weighted"):
        sweep_config(tmp_path, datasets=["synth_classification"], search={"metric": "f1_weighted", "mode": "min"})


# --------------------------------------------------------------------------------------------------
# dispatch, names, shapes
# --------------------------------------------------------------------------------------------------

SUITE_INPUTS = {
    "mosi": (_arr([0.5, -1.0, 2.0, 0.0]), _arr([1.0, -1.0, 2.0, -0.5])),
    "sims": (_arr([0.5, -1.0, 0.2, 0.0]), _arr([0.6, -0.8, 0.2, -0.4])),
    "classification": (np.array([0, 1, 2, 1]), np.array([0, 1, 1, 1])),
}


@pytest.mark.parametrize("suite", sorted(SUITE_METRICS))
def test_suite_returns_exactly_its_metric_names_in_order(suite):
    result = compute_metrics(suite, *SUITE_INPUTS[suite])
    assert list(result) == list(SUITE_METRICS[suite])
    assert all(isinstance(value, float) for value in result.values())


def test_suite_metrics_names():
    assert SUITE_METRICS == {
        "mosi": ("acc2_has0", "f1_has0", "acc2_non0", "f1_non0", "acc5", "acc7", "mae", "corr"),
        "sims": ("acc2", "acc3", "acc5", "f1", "mae", "corr"),
        "classification": ("acc", "f1_macro", "precision_macro", "recall_macro", "f1_weighted"),
    }


@pytest.mark.parametrize(
    ("suite", "function"),
    [("mosi", mosi_metrics), ("sims", sims_metrics), ("classification", classification_metrics)],
)
def test_compute_metrics_dispatches_to_suite_function(suite, function):
    assert compute_metrics(suite, *SUITE_INPUTS[suite]) == function(*SUITE_INPUTS[suite])


@pytest.mark.parametrize("suite", ["MOSI", "mosei", "regression", ""])
def test_compute_metrics_unknown_suite_raises(suite):
    with pytest.raises(ValueError):
        compute_metrics(suite, _arr([0.0, 1.0]), _arr([0.0, 1.0]))


@pytest.mark.parametrize(
    ("suite", "pred", "truth"),
    [
        ("mosi", _arr([0.1, 0.2, 0.3]), _arr([0.1, 0.2, 0.3, 0.4])),
        ("sims", _arr([0.1, 0.2, 0.3, 0.4, 0.5]), _arr([0.1, 0.2, 0.3, 0.4])),
        ("classification", np.array([0, 1, 1]), np.array([0, 1, 1, 0])),
        ("classification", np.zeros((5, 3)), np.array([0, 1, 1, 0])),  # (N, C) scores, wrong N
        ("mosi", np.zeros((2, 2)), _arr([0.1, 0.2, 0.3, 0.4])),  # same size, wrong shape
        ("sims", np.zeros((2, 2)), _arr([0.1, 0.2, 0.3, 0.4])),
    ],
)
def test_shape_mismatch_raises(suite, pred, truth):
    with pytest.raises(ValueError):
        compute_metrics(suite, pred, truth)


# --------------------------------------------------------------------------------------------------
# selection direction
# --------------------------------------------------------------------------------------------------


def test_metric_modes_only_mae_is_minimised():
    all_names = {name for names in SUITE_METRICS.values() for name in names}
    assert set(METRIC_MODES) == all_names
    assert METRIC_MODES["mae"] == "min"
    assert all(mode == "max" for name, mode in METRIC_MODES.items() if name != "mae")


@pytest.mark.parametrize(
    ("metric", "candidate", "incumbent", "expected"),
    [
        # maximised metrics: strictly larger wins
        ("acc2_non0", 80.0, 75.0, True),
        ("acc2_non0", 75.0, 80.0, False),
        ("acc2_non0", 80.0, 80.0, False),  # a tie is not an improvement
        ("corr", -0.1, -0.5, True),
        ("acc", 0.0, None, True),  # no incumbent: anything finite wins
        # MAE is minimised: strictly smaller wins
        ("mae", 0.70, 0.80, True),
        ("mae", 0.80, 0.70, False),
        ("mae", 0.70, 0.70, False),
        ("mae", 5.0, None, True),
        # NaN candidate never wins, not even against a missing incumbent
        ("acc2_non0", math.nan, 50.0, False),
        ("acc2_non0", math.nan, None, False),
        ("mae", math.nan, 1.0, False),
        ("mae", math.nan, None, False),
        ("f1_non0", math.nan, math.nan, False),
        # a NaN incumbent is treated like a missing one
        ("f1_non0", 10.0, math.nan, True),
        ("mae", 3.0, math.nan, True),
    ],
)
def test_is_better(metric, candidate, incumbent, expected):
    assert is_better(metric, candidate, incumbent) is expected


@pytest.mark.parametrize(("edge", "below"), [(-0.7, -0.8), (-0.1, -0.5), (0.1, 0.0), (0.7, 0.5)])
def test_sims_float32_edges_bin_like_mmsa(edge, below):
    # float32(-0.7) is -0.69999998..., float32(0.1) is 0.10000000149... in float64; MMSA compares in
    # float32, where each is exactly its edge, so it belongs to the bin below (bins are (lo, hi]).
    pred = np.array([edge], dtype=np.float32)
    truth = np.array([below], dtype=np.float32)
    scores = sims_metrics(pred, truth)
    assert scores["acc5"] == 100.0


@pytest.mark.parametrize("seed", range(20))
def test_numpy_scores_match_scikit_learn(seed):
    from sklearn.metrics import f1_score, precision_score, recall_score

    from msa.platform.core.metrics import macro_scores, weighted_f1

    rng = np.random.default_rng(seed)
    n, classes = int(rng.integers(1, 40)), int(rng.integers(2, 8))
    truth, pred = rng.integers(0, classes, n), rng.integers(0, classes, n)
    assert weighted_f1(truth, pred) == pytest.approx(
        100 * f1_score(truth, pred, average="weighted", zero_division=0), abs=1e-9
    )
    assert classification_metrics(pred, truth)["f1_weighted"] == pytest.approx(
        100 * f1_score(truth, pred, average="weighted", zero_division=0), abs=1e-9
    )
    macro = macro_scores(truth, pred)
    for name, sklearn_score in (("f1_macro", f1_score), ("precision_macro", precision_score),
                                ("recall_macro", recall_score)):
        assert macro[name] == pytest.approx(100 * sklearn_score(truth, pred, average="macro", zero_division=0), abs=1e-9)


def test_one_place_knows_each_metrics_direction():
    """`loss_of` orders every metric lower-is-better with undefined values last; `is_better`,
    `best_of` and `direction` agree with it."""
    assert [direction(m) for m in ("mae", "corr", "acc2_non0", "acc")] == ["lower", "higher", "higher", "higher"]
    assert sorted([0.9, float("nan"), 0.7], key=lambda v: loss_of("mae", v))[:2] == [0.7, 0.9]
    assert sorted([70.0, None, 80.0], key=lambda v: loss_of("acc", v))[:2] == [80.0, 70.0]
    assert best_of("mae", np.array([0.9, np.nan, 0.7])) == 0.7 and best_of("corr", np.array([0.1, 0.5])) == 0.5
    assert math.isnan(best_of("mae", np.array([np.nan, np.nan])))
    assert is_better("acc", 80.0, 70.0) and not is_better("mae", 0.9, 0.7) and not is_better("mae", float("nan"), None)
