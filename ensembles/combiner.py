"""How a fitted ensemble combines its members' predictions at serving time: `combine` applies a
meta-learner's JSON combiner with numpy alone (no scikit-learn, SciPy or learner object), so a
registered ensemble carries this module and nothing of the fitting code (`meta_learners.py`).

Runs in whichever process loads a registered ensemble, and in the driver when learners predict.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from msa.platform.core.errors import MsaError

# Probabilities are clipped here before the log, so a member that is certain does not give -inf.
LOG_FLOOR = 1e-7


def combine(combiner: dict[str, Any], predictions: np.ndarray) -> np.ndarray:
    """Apply a fitted combiner to member predictions.

    Args:
        combiner: a learner's ``combiner`` (possibly read back from JSON).
        predictions: ``(N, M)`` scores (regression) or ``(N, M, C)`` probabilities (classification).

    Returns:
        ``(N,)`` scores or ``(N, C)`` probabilities.

    Kinds:
        ``{"kind": "weighted", "weights": [M], "intercept": b}``: ``sum_m w_m P[:, m] + b``
        (classification learners write ``b = 0`` and weights summing to 1, so rows stay
        probabilities).
        ``{"kind": "softmax", "coef": C x (M*C), "intercept": [C]}``: with
        ``X = log(clip(P, 1e-7, 1)).reshape(N, M*C)``, ``softmax(X @ coef.T + intercept)``.
    """
    predictions = np.asarray(predictions, dtype=np.float64)
    kind = combiner.get("kind")
    if kind == "weighted":
        weights = np.asarray(combiner["weights"], dtype=np.float64)
        if predictions.ndim not in (2, 3) or predictions.shape[1] != len(weights):
            raise MsaError(f"the combiner has {len(weights)} members; expected predictions (N, {len(weights)}) "
                           f"or (N, {len(weights)}, C), got shape {predictions.shape}")
        return np.tensordot(predictions, weights, axes=([1], [0])) + float(combiner["intercept"])
    if kind == "softmax":
        coef = np.asarray(combiner["coef"], dtype=np.float64)  # (C, M*C)
        intercept = np.asarray(combiner["intercept"], dtype=np.float64)  # (C,)
        classes = len(intercept)
        if predictions.ndim != 3 or predictions.shape[2] != classes or predictions[0].size != coef.shape[1]:
            raise MsaError(f"the combiner expects probabilities (N, {coef.shape[1] // classes}, {classes}), "
                           f"got shape {predictions.shape}")
        return softmax(log_features(predictions) @ coef.T + intercept)
    raise MsaError(f"unknown combiner kind {kind!r}; known: weighted, softmax")


def log_features(probabilities: np.ndarray) -> np.ndarray:
    """``(N, M, C)`` probabilities -> ``(N, M*C)`` clipped log-probabilities, member-major."""
    return np.log(np.clip(probabilities, LOG_FLOOR, 1.0)).reshape(len(probabilities), -1)


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)
