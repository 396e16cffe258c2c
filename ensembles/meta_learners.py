"""Meta-learners: how a stacked ensemble combines its members' predictions.

A meta-learner is fitted on a `PredictionMatrix` of valid (or out-of-fold) predictions, never on
test, and reduces to a JSON-serialisable ``combiner``. At serving time `combiner.combine`
applies it with numpy alone, so a served ensemble needs neither scikit-learn nor the learner object.

Five learners, one registry (`META_LEARNERS`):

* ``mean``: uniform weights.
* ``nnls``: non-negative least-squares weights, optionally constrained to sum to one.
* ``ridge`` (regression): linear stacking with an intercept and strong L2.
* ``logistic`` (classification): multinomial logistic regression on member log-probabilities.
* ``caruana``: greedy ensemble selection with replacement on the selection metric (Caruana et al.,
  "Ensemble Selection from Libraries of Models", ICML 2004).

Combiner kinds (see `combine`): ``weighted`` (``P @ w + b`` for regression, a convex mix of
member probabilities for classification) and ``softmax`` (a linear model on log-probabilities).

Example:
    >>> import numpy as np
    >>> from msa.ensembles.matrix import PredictionMatrix
    >>> valid = PredictionMatrix(split="valid", ids=("a", "b", "c"), labels=np.array([1.0, -1.0, 2.0]),
    ...                          predictions=np.array([[1.0, 0.0], [-1.0, 1.0], [2.0, 0.0]]),
    ...                          members=("good", "noise"), task="regression")
    >>> learner = make_meta_learner("nnls", task="regression", suite="mosi", metric="mae").fit(valid)
    >>> {member: round(weight, 6) for member, weight in learner.weights().items()}
    {'good': 1.0, 'noise': 0.0}
    >>> combine(learner.combiner, np.array([[0.5, 3.0]])).round(6)
    array([0.5])
"""
from __future__ import annotations

import numbers
from typing import Any, ClassVar

import numpy as np
from scipy.optimize import nnls

from msa.ensembles.combiner import combine, log_features
from msa.ensembles.matrix import PredictionMatrix
from msa.platform.core.errors import MsaError
from msa.platform.core.metrics import SUITE_METRICS, best_of, compute_metrics

TASKS = ("regression", "classification")
# A class absent from the training labels gets a logit this far below the mean of the present
# classes' logits, hence below their maximum: its probability is at most e^-30 (about 1e-13).
ABSENT_CLASS_OFFSET = 30.0


class TestSplitError(MsaError):
    """A meta-learner was asked to fit on the test split (which would tune the ensemble on test)."""

    __test__ = False  # not a pytest test class, whatever its name


def _weighted(weights: np.ndarray, intercept: float = 0.0) -> dict[str, Any]:
    return {"kind": "weighted", "weights": np.asarray(weights, dtype=np.float64).tolist(),
            "intercept": float(intercept)}


# --------------------------------------------------------------------------------------------------
# The base class
# --------------------------------------------------------------------------------------------------


class MetaLearner:
    """Combines member predictions; fitted on valid (or out-of-fold) predictions, never on test.

    Subclasses set `name`, `tasks` and `defaults` (their options and default values), and
    implement `_fit`, which sets ``self.combiner``; prediction is always `combine` on that
    combiner, so what is served is exactly what was fitted.

    Args:
        suite: metric suite of the dataset (``mosi``, ``sims`` or ``classification``).
        metric: the selection metric, one of the suite's (used by ``caruana``).
        **options: the learner's own options (see its `defaults`).

    Attributes:
        combiner: JSON-serialisable description of the fitted combination (None until fitted).
        members: member names the combiner's columns belong to (empty until fitted).
    """

    name: ClassVar[str]
    tasks: ClassVar[tuple[str, ...]]
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, *, suite: str, metric: str, **options: Any) -> None:
        if suite not in SUITE_METRICS:
            raise MsaError(f"unknown metric suite {suite!r}; known: {', '.join(SUITE_METRICS)}")
        if metric not in SUITE_METRICS[suite]:
            raise MsaError(f"metric {metric!r} is not in suite {suite!r}; it has {', '.join(SUITE_METRICS[suite])}")
        self.suite = suite
        self.metric = metric
        self._options = {**self.defaults, **{key: self._coerce(key, value) for key, value in options.items()}}
        self._check_options()
        self.combiner: dict[str, Any] | None = None
        self.members: tuple[str, ...] = ()

    def _coerce(self, key: str, value: Any) -> Any:
        """`value` as the type of the option's default; unknown options and wrong types are errors."""
        if key not in self.defaults:
            valid = ", ".join(self.defaults) or "none"
            raise MsaError(f"meta-learner {self.name!r} has no option {key!r}; valid options: {valid}")
        expected = type(self.defaults[key])
        if expected is bool:
            valid_type = isinstance(value, (bool, np.bool_))
        else:
            number = numbers.Integral if expected is int else numbers.Real
            valid_type = isinstance(value, number) and not isinstance(value, (bool, np.bool_))
        if not valid_type:
            raise MsaError(f"meta-learner {self.name!r}: option {key} must be {expected.__name__}, got {value!r}")
        return expected(value)

    def _check_options(self) -> None:
        """Range checks of the options; overridden by learners whose options have a range."""

    def options(self) -> dict[str, Any]:
        """The learner's own options with defaults filled in (suite and metric are attributes)."""
        return dict(self._options)

    def fresh(self) -> MetaLearner:
        """An unfitted copy with the same suite, metric and options (for cross-fitting)."""
        return type(self)(suite=self.suite, metric=self.metric, **self._options)

    def fit(self, matrix: PredictionMatrix) -> MetaLearner:
        """Fit on `matrix`, which must not come from the test split.

        Raises:
            TestSplitError: `matrix` is (a subset of) the test split.
            MsaError: a task the learner does not support, a suite that does not fit the task, an
                empty matrix, non-finite predictions (naming the members) or invalid labels.
        """
        if matrix.is_test:
            raise TestSplitError(f"meta-learner {self.name!r} refuses to fit on split {matrix.split!r}: "
                                 "meta-learners are fitted on valid (or out-of-fold) predictions only")
        if matrix.task not in self.tasks:
            raise MsaError(f"meta-learner {self.name!r} does not support {matrix.task}; "
                           f"for {matrix.task} use one of: {', '.join(learners_for(matrix.task))}")
        if (self.suite == "classification") != (matrix.task == "classification"):
            raise MsaError(f"metric suite {self.suite!r} does not apply to a {matrix.task} matrix")
        _check_matrix(matrix)
        self._fit(matrix)
        self.members = matrix.members
        return self

    def _fit(self, matrix: PredictionMatrix) -> None:
        raise NotImplementedError

    def predict(self, predictions: np.ndarray) -> np.ndarray:
        """``(N, M)`` scores -> ``(N,)``, or ``(N, M, C)`` probabilities -> ``(N, C)`` probabilities."""
        return combine(self._fitted_combiner(), predictions)

    def weights(self) -> dict[str, float]:
        """One number per member: its weight in the combination."""
        return dict(zip(self.members, self._fitted_combiner()["weights"]))

    def _fitted_combiner(self) -> dict[str, Any]:
        if self.combiner is None:
            raise RuntimeError(f"meta-learner {self.name!r} is not fitted; call fit() first")
        return self.combiner


def _check_matrix(matrix: PredictionMatrix) -> None:
    """Refuse what no learner can fit: no rows or members, non-finite values, invalid labels."""
    if len(matrix) == 0 or not matrix.members:
        raise MsaError(f"cannot fit a meta-learner on an empty prediction matrix "
                       f"(split {matrix.split!r}: {len(matrix)} rows, {len(matrix.members)} members)")
    finite = np.isfinite(matrix.predictions).reshape(len(matrix), len(matrix.members), -1).all(axis=(0, 2))
    if not finite.all():
        broken = ", ".join(member for member, ok in zip(matrix.members, finite) if not ok)
        raise MsaError(f"member(s) {broken} have NaN or infinite predictions on split {matrix.split!r}; "
                       "drop them from the ensemble")
    labels = np.asarray(matrix.labels, dtype=np.float64)
    if matrix.task == "classification":
        classes = matrix.predictions.shape[2]
        if not np.all((labels == np.round(labels)) & (labels >= 0) & (labels < classes)):
            raise MsaError(f"classification labels on split {matrix.split!r} must be class ids in [0, {classes})")
    elif not np.isfinite(labels).all():
        raise MsaError(f"labels on split {matrix.split!r} contain NaN or infinite values")


def _arrays(matrix: PredictionMatrix) -> tuple[np.ndarray, np.ndarray]:
    """Predictions as float64; labels as float64 (regression) or int64 class ids (classification)."""
    labels_type = np.int64 if matrix.task == "classification" else np.float64
    return np.asarray(matrix.predictions, dtype=np.float64), np.asarray(matrix.labels).astype(labels_type)


# --------------------------------------------------------------------------------------------------
# The learners
# --------------------------------------------------------------------------------------------------


class Mean(MetaLearner):
    """Uniform weights: the plain average of the members (of their probabilities for classification)."""

    name = "mean"
    tasks = TASKS

    def _fit(self, matrix: PredictionMatrix) -> None:
        members = len(matrix.members)
        self.combiner = _weighted(np.full(members, 1.0 / members))


class NNLS(MetaLearner):
    """Non-negative least-squares weights (no intercept).

    Regression: ``min ||P w - y||`` over ``w >= 0``. Classification: the same over the N*C rows of
    each member's probabilities against the one-hot truth, then the weights are normalised to sum
    to 1 (argmax does not depend on their scale, and rows must stay probabilities). If every
    weight comes out 0 (no member helps), the weights fall back to uniform (the plain mean).

    Args:
        sum_to_one: solve under the constraint ``sum(w) = 1`` (exactly, not by renormalising the
            unconstrained solution).

    Example:
        >>> learner = NNLS(suite="mosi", metric="mae", sum_to_one=True)
        >>> learner.options()
        {'sum_to_one': True}
    """

    name = "nnls"
    tasks = TASKS
    defaults = {"sum_to_one": False}

    def _fit(self, matrix: PredictionMatrix) -> None:
        predictions, labels = _arrays(matrix)
        if matrix.task == "classification":
            classes = predictions.shape[2]
            design = predictions.transpose(0, 2, 1).reshape(-1, predictions.shape[1])  # (N*C, M)
            target = np.eye(classes)[labels].reshape(-1)  # (N*C,)
        else:
            design, target = predictions, labels
        if self._options["sum_to_one"]:
            weights = _simplex_least_squares(design, target)
        else:
            weights, _ = nnls(design, target)
            if not weights.any():
                weights = np.full_like(weights, 1.0 / len(weights))
            if matrix.task == "classification":
                weights = weights / weights.sum()
        self.combiner = _weighted(weights)


def _simplex_least_squares(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``argmin ||A w - b||`` over ``w >= 0, sum(w) = 1``, solved exactly with one NNLS.

    On the simplex ``A w - b = D w`` with ``D = A - b 1^T``, so the problem is ``min ||D u||``.
    NNLS on ``D`` plus one row ``lam * 1^T v = lam`` returns ``v = t u`` with ``t > 0``: for a
    direction ``u`` its best objective ``min_t t^2 ||D u||^2 + lam^2 (t - 1)^2`` increases with
    ``||D u||``, so the direction is the constrained minimiser and ``u = v / sum(v)``.
    """
    scale = np.sqrt(len(target))  # of the order of D's column norms, for conditioning only
    augmented = np.vstack([design - target[:, None], np.full((1, design.shape[1]), scale)])
    solution, _ = nnls(augmented, np.append(np.zeros(len(target)), scale))
    return solution / solution.sum()


class Ridge(MetaLearner):
    """Linear stacking with an intercept and strong L2 (member predictions are highly collinear).

    Args:
        alpha: L2 strength of scikit-learn's ``Ridge``.
    """

    name = "ridge"
    tasks = ("regression",)
    defaults = {"alpha": 10.0}

    def _check_options(self) -> None:
        if self._options["alpha"] < 0:
            raise MsaError(f"meta-learner 'ridge': alpha must be >= 0, got {self._options['alpha']}")

    def _fit(self, matrix: PredictionMatrix) -> None:
        # Imported here: serving only needs `combine`, and scikit-learn costs seconds to import.
        from sklearn.linear_model import Ridge as RidgeRegression

        predictions, labels = _arrays(matrix)
        model = RidgeRegression(alpha=self._options["alpha"]).fit(predictions, labels)
        self.combiner = _weighted(model.coef_, float(model.intercept_))


class Logistic(MetaLearner):
    """Multinomial logistic regression with strong L2 on the members' log-probabilities.

    Features are ``log(clip(P, 1e-7, 1))`` of every member and class (``M*C`` per row). Classes
    absent from the training labels get a zero-probability row (about 1e-13); with a single class
    present the prediction is that class. `weights` gives each member's share of the total
    absolute coefficient mass (the shares sum to 1).

    Args:
        C: inverse L2 strength of scikit-learn's ``LogisticRegression`` (lbfgs).
    """

    name = "logistic"
    tasks = ("classification",)
    defaults = {"C": 0.1}

    def _check_options(self) -> None:
        if self._options["C"] <= 0:
            raise MsaError(f"meta-learner 'logistic': C must be > 0, got {self._options['C']}")

    def _fit(self, matrix: PredictionMatrix) -> None:
        from sklearn.linear_model import LogisticRegression  # see Ridge._fit

        predictions, labels = _arrays(matrix)
        classes = predictions.shape[2]
        features = log_features(predictions)
        present = np.unique(labels)
        coef = np.zeros((classes, features.shape[1]))
        intercept = np.zeros(classes)
        if len(present) > 1:
            model = LogisticRegression(C=self._options["C"], max_iter=1000).fit(features, labels)
            if len(present) == 2:  # one logit for the second class against the first, whose logit is 0
                coef[present[1]], intercept[present[1]] = model.coef_[0], model.intercept_[0]
            else:  # sklearn's rows follow its classes_, which are the present labels, sorted
                coef[present], intercept[present] = model.coef_, model.intercept_
        absent = np.setdiff1d(np.arange(classes), present)
        coef[absent] = coef[present].mean(axis=0)
        intercept[absent] = intercept[present].mean() - ABSENT_CLASS_OFFSET
        self.combiner = {"kind": "softmax", "coef": coef.tolist(), "intercept": intercept.tolist()}

    def weights(self) -> dict[str, float]:
        coef = np.asarray(self._fitted_combiner()["coef"])
        mass = np.abs(coef.reshape(len(coef), len(self.members), -1)).sum(axis=(0, 2))
        shares = mass / mass.sum() if mass.sum() > 0 else np.full(len(self.members), 1.0 / len(self.members))
        return dict(zip(self.members, shares.tolist()))


class Caruana(MetaLearner):
    """Greedy ensemble selection with replacement (Caruana et al., ICML 2004).

    Starting from an empty ensemble, each step adds the member (possibly again) whose addition
    gives the running average (of probabilities, for classification) the best selection metric.
    Ties go to members already chosen, then to a seeded random choice; NaN scores never win. The
    selection is cut at the earliest step reaching the best score, and a member's weight is the
    share of the kept steps that chose it.

    Args:
        steps: selection steps (the ensemble size before the cut).
        seed: seed of the tie-breaking generator.

    Attributes:
        trajectory: the metric of the running average after each step (all `steps`, before the cut).

    Example:
        >>> learner = Caruana(suite="mosi", metric="mae", steps=10)
        >>> learner.fresh().options()
        {'steps': 10, 'seed': 0}
    """

    name = "caruana"
    tasks = TASKS
    defaults = {"steps": 25, "seed": 0}

    def __init__(self, *, suite: str, metric: str, **options: Any) -> None:
        super().__init__(suite=suite, metric=metric, **options)
        self.trajectory: list[float] = []

    def _check_options(self) -> None:
        if self._options["steps"] < 1 or self._options["seed"] < 0:
            raise MsaError(f"meta-learner 'caruana': steps must be >= 1 and seed >= 0, got {self._options}")

    def _fit(self, matrix: PredictionMatrix) -> None:
        predictions, labels = _arrays(matrix)
        rng = np.random.default_rng(self._options["seed"])
        total = np.zeros_like(predictions[:, 0])  # running sum of the chosen members: (N,) or (N, C)
        counts = np.zeros(predictions.shape[1], dtype=np.int64)
        chosen: list[int] = []
        self.trajectory = []
        for step in range(1, self._options["steps"] + 1):
            candidates = (total[:, None] + predictions) / step  # every member added in turn
            scores = np.array([compute_metrics(self.suite, candidates[:, m], labels)[self.metric]
                               for m in range(predictions.shape[1])])
            winner = self._pick(scores, counts, rng)
            counts[winner] += 1
            chosen.append(winner)
            total = total + predictions[:, winner]
            self.trajectory.append(float(scores[winner]))
        trajectory = np.array(self.trajectory)
        best = best_of(self.metric, trajectory)
        kept = chosen[: int(np.flatnonzero(trajectory == best)[0]) + 1]
        self.combiner = _weighted(np.bincount(kept, minlength=predictions.shape[1]) / len(kept))

    def _pick(self, scores: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> int:
        """The best-scoring member; ties: already chosen ones first, then a seeded random choice."""
        if np.isnan(scores).all():
            raise MsaError(f"meta-learner 'caruana': metric {self.metric!r} is undefined (NaN) for every "
                           "candidate on these labels; choose another selection metric")
        best = best_of(self.metric, scores)
        tied = np.flatnonzero(scores == best)
        reused = tied[counts[tied] > 0]
        if reused.size:
            tied = reused
        return int(tied[0]) if tied.size == 1 else int(rng.choice(tied))


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

META_LEARNERS: dict[str, type[MetaLearner]] = {
    learner.name: learner for learner in (Mean, NNLS, Ridge, Logistic, Caruana)
}


def learners_for(task: str) -> list[str]:
    """Names of the meta-learners that support `task`, in registry order."""
    if task not in TASKS:
        raise MsaError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return [name for name, learner in META_LEARNERS.items() if task in learner.tasks]


def make_meta_learner(name: str, *, task: str, suite: str, metric: str, **options: Any) -> MetaLearner:
    """An unfitted meta-learner by name, checked against the task it will be fitted on.

    Raises:
        MsaError: an unknown name, a learner that does not support `task`, an unknown option or an
            option of the wrong type or range, a metric not in `suite`.

    Example:
        >>> make_meta_learner("ridge", task="regression", suite="sims", metric="mae", alpha=1.0).options()
        {'alpha': 1.0}
    """
    valid = learners_for(task)
    if name not in valid:
        problem = "unknown meta-learner" if name not in META_LEARNERS else f"{task} is not supported by meta-learner"
        raise MsaError(f"{problem} {name!r}; valid for {task}: {', '.join(valid)}")
    return META_LEARNERS[name](suite=suite, metric=metric, **options)
