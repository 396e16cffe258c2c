"""Tests for ``msa.ensembles.meta_learners`` on synthetic members whose best combination is known.

Regression: labels ~ U[-3, 3]; three members are the label plus independent Gaussian noise
(sigma 0.4, 0.6, 0.8), so inverse-variance weighting beats the best of them, and one member is
noise independent of the label. Classification (4 classes): three members are softmaxes of a
true-class logit plus noise of increasing size, and one member is uniform-random probabilities.
Learners are fitted on a "valid" matrix and scored on a "holdout" matrix drawn the same way.

Covered: the registry, shapes and probabilities of every learner's predictions, the JSON combiner
reproducing `predict` exactly, the refusal to fit on test (also on a subset of test), beating the
best member and ignoring the useless one, NNLS's constraints and fallback, Caruana's determinism,
cut at the best step, tie-breaking and first step, `fresh`, option and input validation, and
logistic regression with classes absent from the training labels.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import minimize

from msa.ensembles import meta_learners
from msa.ensembles.combiner import combine
from msa.ensembles.matrix import PredictionMatrix
from msa.ensembles.meta_learners import (
    META_LEARNERS,
    NNLS,
    Caruana,
    Logistic,
    Mean,
    Ridge,
    learners_for,
    make_meta_learner,
)
from msa.platform.core.errors import MsaError
from msa.platform.core.metrics import compute_metrics

# task -> (metric suite, selection metric)
SUITES = {"regression": ("mosi", "mae"), "classification": ("classification", "acc")}
REGRESSION_SIGMAS = (0.4, 0.6, 0.8)
CLASSIFICATION_NOISE = (1.0, 1.5, 2.0)
CLASSES = 4
ROWS = 600
USELESS = "useless"
EVERY_LEARNER = [(task, name) for task in SUITES for name in learners_for(task)]
# Non-default options per learner, to check that `fresh` and `options` carry them.
CUSTOM_OPTIONS = {"mean": {}, "nnls": {"sum_to_one": True}, "ridge": {"alpha": 2.5}, "logistic": {"C": 1.0},
                  "caruana": {"steps": 7, "seed": 3}}


def _matrix(split: str, labels: np.ndarray, predictions: np.ndarray, members: tuple[str, ...],
            task: str) -> PredictionMatrix:
    ids = tuple(f"clip_{i}" for i in range(len(labels)))
    return PredictionMatrix(split=split, ids=ids, labels=labels, predictions=predictions, members=members,
                            task=task)


def regression_matrix(split: str, *, seed: int, rows: int = ROWS) -> PredictionMatrix:
    """Noisy copies of the label (sigmas 0.4, 0.6, 0.8) and one member of pure noise."""
    rng = np.random.default_rng(seed)
    labels = rng.uniform(-3.0, 3.0, rows)
    good = labels[:, None] + rng.normal(size=(rows, len(REGRESSION_SIGMAS))) * np.array(REGRESSION_SIGMAS)
    useless = rng.uniform(-3.0, 3.0, rows)
    members = tuple(f"sigma_{sigma}" for sigma in REGRESSION_SIGMAS) + (USELESS,)
    return _matrix(split, labels, np.column_stack([good, useless]), members, "regression")


def classification_matrix(split: str, *, seed: int, rows: int = ROWS) -> PredictionMatrix:
    """Softmax of (2 * one-hot truth + noise) at three noise levels, and uniform-random probabilities."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, rows)
    probabilities = []
    for noise in CLASSIFICATION_NOISE:
        logits = 2.0 * np.eye(CLASSES)[labels] + noise * rng.normal(size=(rows, CLASSES))
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities.append(exp / exp.sum(axis=1, keepdims=True))
    probabilities.append(rng.dirichlet(np.ones(CLASSES), size=rows))
    members = tuple(f"noise_{noise}" for noise in CLASSIFICATION_NOISE) + (USELESS,)
    return _matrix(split, labels, np.stack(probabilities, axis=1), members, "classification")


def learner_for(task: str, name: str, **options) -> meta_learners.MetaLearner:
    suite, metric = SUITES[task]
    return make_meta_learner(name, task=task, suite=suite, metric=metric, **options)


def score(task: str, prediction: np.ndarray, labels: np.ndarray) -> float:
    suite, metric = SUITES[task]
    return compute_metrics(suite, prediction, labels)[metric]


def single_member_scores(matrix: PredictionMatrix) -> list[float]:
    return [score(matrix.task, matrix.predictions[:, m], matrix.labels) for m in range(len(matrix.members))]


@pytest.fixture(scope="module")
def data() -> dict[str, tuple[PredictionMatrix, PredictionMatrix]]:
    """task -> (valid, holdout)."""
    return {
        "regression": (regression_matrix("valid", seed=0), regression_matrix("holdout", seed=1)),
        "classification": (classification_matrix("valid", seed=0), classification_matrix("holdout", seed=1)),
    }


@pytest.fixture(scope="module", params=EVERY_LEARNER, ids=[f"{task}-{name}" for task, name in EVERY_LEARNER])
def fitted(request, data):
    """(every learner x task) fitted on valid, with the holdout matrix to predict."""
    task, name = request.param
    valid, holdout = data[task]
    return learner_for(task, name).fit(valid), holdout


def fit(task: str, name: str, matrix: PredictionMatrix, **options) -> meta_learners.MetaLearner:
    return learner_for(task, name, **options).fit(matrix)


# --------------------------------------------------------------------------------------------------
# Every learner
# --------------------------------------------------------------------------------------------------


def test_registry_lists_every_learner_by_task():
    assert list(META_LEARNERS) == ["mean", "nnls", "ridge", "logistic", "caruana"]
    assert learners_for("regression") == ["mean", "nnls", "ridge", "caruana"]
    assert learners_for("classification") == ["mean", "nnls", "logistic", "caruana"]
    assert all(META_LEARNERS[name].name == name for name in META_LEARNERS)


def test_predictions_have_the_task_shape(fitted):
    learner, holdout = fitted
    predicted = learner.predict(holdout.predictions)
    if holdout.task == "regression":
        assert predicted.shape == (len(holdout),)
        assert np.isfinite(predicted).all()
    else:
        assert predicted.shape == (len(holdout), CLASSES)
        assert (predicted >= 0).all()
        np.testing.assert_allclose(predicted.sum(axis=1), 1.0, atol=1e-9)


def test_json_combiner_reproduces_predict_exactly(fitted):
    learner, holdout = fitted
    restored = json.loads(json.dumps(learner.combiner))
    assert np.array_equal(combine(restored, holdout.predictions), learner.predict(holdout.predictions))


def test_weights_are_one_float_per_member(fitted):
    learner, holdout = fitted
    weights = learner.weights()
    assert list(weights) == list(holdout.members)
    assert all(isinstance(value, float) for value in weights.values())
    if holdout.task == "classification":  # convex mixes, and the logistic shares of coefficient mass
        assert sum(weights.values()) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(("task", "name"), EVERY_LEARNER)
def test_fitting_on_test_is_refused(task, name, data):
    valid, _ = data[task]
    test = PredictionMatrix("test", valid.ids, valid.labels, valid.predictions, valid.members, task)
    learner = learner_for(task, name)
    with pytest.raises(meta_learners.TestSplitError, match=rf"'{name}'.*split 'test'"):
        learner.fit(test)
    with pytest.raises(meta_learners.TestSplitError):
        learner.fit(test.subset(np.arange(100)))
    with pytest.raises(meta_learners.TestSplitError):
        learner.fit(test.select([0, 1]))
    assert learner.combiner is None
    assert isinstance(meta_learners.TestSplitError("x"), MsaError)


@pytest.mark.parametrize(("task", "name"), EVERY_LEARNER)
def test_fresh_is_an_unfitted_copy_with_the_same_options(task, name, data):
    learner = learner_for(task, name, **CUSTOM_OPTIONS[name]).fit(data[task][0])
    copy = learner.fresh()
    assert type(copy) is type(learner) and copy is not learner
    assert (copy.suite, copy.metric) == (learner.suite, learner.metric)
    assert copy.options() == learner.options() == {**META_LEARNERS[name].defaults, **CUSTOM_OPTIONS[name]}
    json.dumps(copy.options())
    assert copy.combiner is None and copy.members == ()
    with pytest.raises(RuntimeError, match="not fitted"):
        copy.predict(data[task][1].predictions)
    with pytest.raises(RuntimeError, match="not fitted"):
        copy.weights()
    assert learner.combiner is not None  # the original is untouched


# --------------------------------------------------------------------------------------------------
# Regression: the known answer
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nnls", "ridge", "caruana"])
def test_regression_stacking_beats_the_best_member_on_holdout(name, data):
    valid, holdout = data["regression"]
    learner = fit("regression", name, valid)
    best_member = min(single_member_scores(holdout))
    assert score("regression", learner.predict(holdout.predictions), holdout.labels) < best_member - 0.03


@pytest.mark.parametrize(("name", "bound"), [("nnls", 0.05), ("caruana", 0.05), ("ridge", 0.05)])
def test_regression_useless_member_gets_almost_no_weight(name, bound, data):
    weights = fit("regression", name, data["regression"][0]).weights()
    assert abs(weights[USELESS]) < bound
    assert all(weights[member] > 0.1 for member in weights if member != USELESS)


def test_mean_of_good_members_beats_the_worst_member(data):
    valid, holdout = data["regression"]
    good = [0, 1, 2]
    learner = fit("regression", "mean", valid.select(good))
    assert learner.weights() == pytest.approx({member: 1 / 3 for member in valid.select(good).members})
    mean_mae = score("regression", learner.predict(holdout.predictions[:, good]), holdout.labels)
    assert mean_mae < max(single_member_scores(holdout.select(good)))


# --------------------------------------------------------------------------------------------------
# NNLS
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sum_to_one", [False, True])
@pytest.mark.parametrize("task", list(SUITES))
def test_nnls_weights_are_non_negative_and_sum_to_one_when_asked(task, sum_to_one, data):
    weights = np.array(list(fit(task, "nnls", data[task][0], sum_to_one=sum_to_one).weights().values()))
    assert (weights >= 0).all()
    if sum_to_one or task == "classification":
        assert weights.sum() == pytest.approx(1.0, abs=1e-6)


def test_nnls_sum_to_one_is_the_constrained_optimum_not_a_renormalisation():
    # Members at half the label's scale: unconstrained weights sum to about 2, so renormalising
    # them would be far from the best convex combination.
    rng = np.random.default_rng(5)
    labels = rng.uniform(-3.0, 3.0, 300)
    predictions = 0.5 * labels[:, None] + rng.normal(size=(300, 3)) * np.array([0.2, 0.3, 0.5])
    matrix = _matrix("valid", labels, predictions, ("a", "b", "c"), "regression")

    def loss(weights: np.ndarray) -> float:
        return float(np.sum((predictions @ weights - labels) ** 2))

    ours = np.array(list(fit("regression", "nnls", matrix, sum_to_one=True).weights().values()))
    free = np.array(list(fit("regression", "nnls", matrix).weights().values()))
    reference = minimize(loss, np.full(3, 1 / 3), method="SLSQP", bounds=[(0, None)] * 3,
                         constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}], options={"ftol": 1e-12}).x
    assert free.sum() > 1.5
    assert ours.sum() == pytest.approx(1.0, abs=1e-12)
    assert loss(ours) <= loss(reference) * (1 + 1e-9)
    assert loss(ours) < loss(free / free.sum()) - 1.0


def test_nnls_falls_back_to_the_mean_when_no_member_helps():
    rng = np.random.default_rng(2)
    labels = rng.uniform(-3.0, 3.0, 200)
    predictions = -labels[:, None] + rng.normal(size=(200, 3)) * 0.3  # every member anti-correlated
    weights = fit("regression", "nnls", _matrix("valid", labels, predictions, ("a", "b", "c"), "regression")).weights()
    assert weights == {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}


# --------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nnls", "logistic", "caruana"])
def test_classification_stacking_matches_the_best_member_on_holdout(name, data):
    valid, holdout = data["classification"]
    learner = fit("classification", name, valid)
    accuracy = score("classification", learner.predict(holdout.predictions), holdout.labels)
    assert accuracy >= max(single_member_scores(holdout)) - 1.0


def test_classification_useless_member_gets_little_weight(data):
    valid = data["classification"][0]
    assert fit("classification", "nnls", valid).weights()[USELESS] < 0.05
    # Selection on accuracy can take the noise member for a step or two where it flips a few
    # near-tied valid rows the right way by chance; it never gets near the best member's share.
    caruana = fit("classification", "caruana", valid).weights()
    assert caruana[USELESS] < 0.2
    assert caruana[USELESS] < max(caruana.values())


def _logistic_on_labels(keep: np.ndarray, data) -> tuple[np.ndarray, PredictionMatrix]:
    valid, holdout = data["classification"]
    learner = fit("classification", "logistic", valid.subset(np.isin(valid.labels, keep)))
    return learner.predict(holdout.predictions), holdout


@pytest.mark.parametrize("present", [[0, 1, 2], [1, 3], [2]], ids=["three", "two", "one"])
def test_logistic_gives_absent_classes_no_probability(present, data):
    probabilities, holdout = _logistic_on_labels(np.array(present), data)
    assert probabilities.shape == (len(holdout), CLASSES)
    assert (probabilities >= 0).all()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-9)
    absent = np.setdiff1d(np.arange(CLASSES), present)
    assert probabilities[:, absent].max() < 1e-10
    predicted = probabilities.argmax(axis=1)
    if len(present) == 1:
        assert (predicted == present[0]).all()
    else:  # on the rows of the classes it saw, it still predicts well
        rows = np.isin(holdout.labels, present)
        assert np.mean(predicted[rows] == holdout.labels[rows]) > 0.8


# --------------------------------------------------------------------------------------------------
# Caruana selection
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(SUITES))
def test_caruana_is_deterministic_for_a_seed(task, data):
    first = fit(task, "caruana", data[task][0], seed=7)
    second = first.fresh().fit(data[task][0])
    assert second.weights() == first.weights()
    assert second.trajectory == first.trajectory
    assert len(first.trajectory) == 25


@pytest.mark.parametrize("task", list(SUITES))
def test_caruana_keeps_the_prefix_up_to_its_best_step(task, data):
    valid = data[task][0]
    learner = fit(task, "caruana", valid, steps=40)
    trajectory = np.array(learner.trajectory)
    best = trajectory.min() if task == "regression" else trajectory.max()
    cut = int(np.flatnonzero(trajectory == best)[0]) + 1
    prefix = fit(task, "caruana", valid, steps=cut)
    assert prefix.trajectory == learner.trajectory[:cut]
    assert prefix.weights() == learner.weights()


def test_caruana_cuts_a_trajectory_that_gets_worse():
    # Members at label + 1 and label - 1: their pair averages to the label exactly (MAE 0), and
    # every third member moves the average off it again (MAE 1/3); the cut keeps the pair.
    labels = np.random.default_rng(0).uniform(-3.0, 3.0, 50)
    matrix = _matrix("valid", labels, np.column_stack([labels + 1.0, labels - 1.0]), ("high", "low"), "regression")
    learner = fit("regression", "caruana", matrix, steps=3)
    assert learner.trajectory == pytest.approx([1.0, 0.0, 1 / 3], abs=1e-12)
    assert learner.weights() == {"high": 0.5, "low": 0.5}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("task", list(SUITES))
def test_caruana_ties_go_to_the_member_already_chosen(task, seed, data):
    valid = data[task][0]
    best = valid.select([0])  # the least noisy member, twice under two names
    twins = PredictionMatrix("valid", valid.ids, valid.labels,
                             np.concatenate([valid.predictions, best.predictions], axis=1),
                             valid.members + ("twin",), task)
    weights = fit(task, "caruana", twins, seed=seed).weights()
    pair = sorted([weights[valid.members[0]], weights["twin"]])
    assert pair[0] == 0.0 and pair[1] > 0.2


@pytest.mark.parametrize("task", list(SUITES))
def test_caruana_first_step_is_the_best_single_member(task, data):
    valid = data[task][0]
    scores = single_member_scores(valid)
    best = int(np.argmin(scores) if task == "regression" else np.argmax(scores))
    learner = fit(task, "caruana", valid, steps=1)
    assert learner.weights() == {member: float(m == best) for m, member in enumerate(valid.members)}
    assert learner.trajectory == [scores[best]]


def test_caruana_refuses_a_metric_undefined_on_the_labels():
    labels = np.zeros(20)  # acc2_non0 drops every zero label: nothing is left to score
    matrix = _matrix("valid", labels, np.random.default_rng(0).normal(size=(20, 2)), ("a", "b"), "regression")
    learner = Caruana(suite="mosi", metric="acc2_non0")
    with pytest.raises(MsaError, match="acc2_non0.*NaN"):
        learner.fit(matrix)


# --------------------------------------------------------------------------------------------------
# Construction and input validation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "task", "options", "message"),
    [
        ("blend", "regression", {}, r"unknown meta-learner 'blend'; valid for regression: mean, nnls, ridge, caruana"),
        ("ridge", "classification", {}, r"classification is not supported by meta-learner 'ridge'; "
                                        r"valid for classification: mean, nnls, logistic, caruana"),
        ("logistic", "regression", {}, r"valid for regression: mean, nnls, ridge, caruana"),
        ("nnls", "regression", {"alpha": 1.0}, r"'nnls' has no option 'alpha'; valid options: sum_to_one"),
        ("mean", "regression", {"steps": 3}, r"'mean' has no option 'steps'; valid options: none"),
        ("caruana", "regression", {"steps": "5"}, r"option steps must be int"),
        ("caruana", "regression", {"steps": 2.5}, r"option steps must be int"),
        ("nnls", "regression", {"sum_to_one": 1}, r"option sum_to_one must be bool"),
        ("caruana", "regression", {"steps": 0}, r"steps must be >= 1"),
        ("logistic", "classification", {"C": 0.0}, r"C must be > 0"),
        ("ridge", "regression", {"alpha": -1.0}, r"alpha must be >= 0"),
        ("nnls", "kinds", {}, r"unknown task 'kinds'"),
    ],
)
def test_make_meta_learner_rejects_bad_requests(name, task, options, message):
    suite, metric = SUITES.get(task, ("mosi", "mae"))
    with pytest.raises(MsaError, match=message):
        make_meta_learner(name, task=task, suite=suite, metric=metric, **options)


def test_make_meta_learner_coerces_numbers_and_checks_the_metric():
    assert learner_for("regression", "ridge", alpha=3).options() == {"alpha": 3.0}
    with pytest.raises(MsaError, match="metric 'acc' is not in suite 'mosi'"):
        make_meta_learner("mean", task="regression", suite="mosi", metric="acc")
    with pytest.raises(MsaError, match="unknown metric suite 'imdb'"):
        make_meta_learner("mean", task="regression", suite="imdb", metric="mae")


def test_fit_refuses_a_task_or_suite_the_learner_cannot_handle(data):
    classification = data["classification"][0]
    with pytest.raises(MsaError, match="'ridge' does not support classification"):
        Ridge(suite="classification", metric="acc").fit(classification)
    with pytest.raises(MsaError, match="suite 'mosi' does not apply to a classification matrix"):
        NNLS(suite="mosi", metric="mae").fit(classification)
    with pytest.raises(MsaError, match="'logistic' does not support regression"):
        Logistic(suite="mosi", metric="mae").fit(data["regression"][0])


@pytest.mark.parametrize("task", list(SUITES))
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_fit_names_members_with_non_finite_predictions(task, bad, data):
    valid = data[task][0]
    predictions = valid.predictions.copy()
    predictions[5, 2] = bad
    broken = PredictionMatrix("valid", valid.ids, valid.labels, predictions, valid.members, task)
    with pytest.raises(MsaError, match=rf"member\(s\) {valid.members[2]} have NaN or infinite"):
        learner_for(task, "mean").fit(broken)


@pytest.mark.parametrize("task", list(SUITES))
def test_fit_refuses_an_empty_matrix(task, data):
    valid = data[task][0]
    for empty in (valid.subset(np.array([], dtype=np.int64)), valid.select([])):
        with pytest.raises(MsaError, match="empty prediction matrix"):
            learner_for(task, "nnls").fit(empty)


def test_fit_refuses_labels_that_are_not_class_ids(data):
    valid = data["classification"][0]
    labels = valid.labels.copy()
    labels[0] = CLASSES
    with pytest.raises(MsaError, match=r"class ids in \[0, 4\)"):
        Mean(suite="classification", metric="acc").fit(
            PredictionMatrix("valid", valid.ids, labels, valid.predictions, valid.members, "classification"))


def test_combine_rejects_unknown_kinds_and_mismatched_shapes():
    with pytest.raises(MsaError, match="unknown combiner kind 'vote'"):
        combine({"kind": "vote"}, np.zeros((2, 2)))
    with pytest.raises(MsaError, match="has 3 members"):
        combine({"kind": "weighted", "weights": [0.5, 0.25, 0.25], "intercept": 0.0}, np.zeros((2, 2)))
    softmax = {"kind": "softmax", "coef": np.zeros((2, 4)).tolist(), "intercept": [0.0, 0.0]}
    with pytest.raises(MsaError, match=r"expects probabilities \(N, 2, 2\)"):
        combine(softmax, np.full((3, 3, 2), 0.5))
    np.testing.assert_allclose(combine(softmax, np.full((3, 2, 2), 0.5)), 0.5)
