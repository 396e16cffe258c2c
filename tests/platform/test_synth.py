"""The synthetic dataset's purpose: its signal is split across modalities, so fusing all of them
beats the best single modality, for regression and for 20-class classification. Checked with
linear models on mean-pooled features, fitted on train and scored on test."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, RidgeCV

from msa.platform.synth import synthesize


def pooled(split, modalities) -> np.ndarray:
    return np.concatenate(
        [split.features[m].sum(axis=1) / np.maximum(split.lengths[m], 1)[:, None] for m in modalities], axis=1
    )


def test_fusion_beats_every_single_modality_in_regression():
    data = synthesize("regression", seed=0)
    train, test = data.splits["train"], data.splits["test"]

    def test_mae(modalities) -> float:
        model = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(pooled(train, modalities), train.labels)
        return float(np.mean(np.abs(model.predict(pooled(test, modalities)) - test.labels)))

    fused = test_mae(data.modalities)
    singles = {m: test_mae((m,)) for m in data.modalities}
    assert fused < 0.6 * min(singles.values()), (fused, singles)


def test_fusion_beats_every_single_modality_in_classification():
    data = synthesize("classification", seed=0)
    train, test = data.splits["train"], data.splits["test"]

    def test_accuracy(modalities) -> float:
        model = LogisticRegression(max_iter=2000).fit(pooled(train, modalities), train.labels)
        return float(np.mean(model.predict(pooled(test, modalities)) == test.labels))

    fused = test_accuracy(data.modalities)
    singles = {m: test_accuracy((m,)) for m in data.modalities}
    assert fused > max(singles.values()) + 0.3, (fused, singles)


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_every_modality_carries_signal(task):
    """No modality is pure noise: each alone beats a constant predictor on train."""
    data = synthesize(task, seed=1)
    train = data.splits["train"]
    for m in data.modalities:
        x = pooled(train, (m,))
        if task == "regression":
            fit = RidgeCV().fit(x, train.labels)
            assert np.mean(np.abs(fit.predict(x) - train.labels)) < np.mean(np.abs(train.labels - np.median(train.labels)))
        else:
            fit = LogisticRegression(max_iter=2000).fit(x, train.labels)
            assert np.mean(fit.predict(x) == train.labels) > 1.5 / len(data.class_names)
