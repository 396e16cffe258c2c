"""The synthetic dataset's purpose: its signal is split across modalities, so fusing all of them
beats the best single modality, for regression and for 20-class classification. Checked with
linear models on mean-pooled features, fitted on train and scored on test."""
from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, RidgeCV

from msa.platform.data.features import FeatureSet
from msa.platform.data.readers import MINTREC_INTENTS, infer_lengths
from msa.platform.data.synth import synthesize

SYNTH_SIZES = {"train": 24, "valid": 16, "test": 16}


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




def all_arrays(dataset: FeatureSet) -> dict[str, np.ndarray]:
    arrays = {}
    for s, split in dataset.splits.items():
        arrays[f"{s}/ids"], arrays[f"{s}/labels"] = split.ids, split.labels
        for m in split.features:
            arrays[f"{s}/{m}"], arrays[f"{s}/{m}_lengths"] = split.features[m], split.lengths[m]
    return arrays


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_synthesize_is_deterministic(task: str) -> None:
    first = all_arrays(synthesize(task, seed=0, sizes=SYNTH_SIZES))
    second = all_arrays(synthesize(task, seed=0, sizes=SYNTH_SIZES))
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].dtype == second[key].dtype, key
        assert first[key].tobytes() == second[key].tobytes(), key
    other = all_arrays(synthesize(task, seed=1, sizes=SYNTH_SIZES))
    assert not np.array_equal(first["train/text"], other["train/text"])
    assert not np.array_equal(first["test/labels"], other["test/labels"])


def test_synthesize_ids_group_several_clips_per_video() -> None:
    dataset = synthesize("regression", seed=0, sizes=SYNTH_SIZES)
    videos_per_split = {}
    all_ids = []
    for s, split in dataset.splits.items():
        for clip_id in split.ids:
            assert re.fullmatch(r"synth\d{4}\$_\$\d+", clip_id), clip_id
        counts = Counter(clip_id.split("$_$")[0] for clip_id in split.ids)
        assert min(counts.values()) >= 2, f"{s}: a video has a single clip"
        videos_per_split[s] = set(counts)
        all_ids.extend(split.ids)
    assert len(set(all_ids)) == len(all_ids)
    assert not videos_per_split["train"] & videos_per_split["valid"]
    assert not videos_per_split["train"] & videos_per_split["test"]
    assert not videos_per_split["valid"] & videos_per_split["test"]


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_synthesize_pads_with_exact_zeros_and_keeps_labels_in_range(task: str) -> None:
    dataset = synthesize(task, seed=2, sizes=SYNTH_SIZES, dims={"text": 5, "audio": 3, "vision": 4},
                         max_lengths={"text": 7, "audio": 9, "vision": 6})
    assert dataset.spec.dims == {"text": 5, "audio": 3, "vision": 4}
    assert dataset.spec.max_lengths == {"text": 7, "audio": 9, "vision": 6}
    for split in dataset.splits.values():
        for m, features in split.features.items():
            lengths = split.lengths[m]
            padding = np.arange(features.shape[1])[None, :] >= lengths[:, None]
            assert (features[padding] == 0.0).all(), m
            np.testing.assert_array_equal(infer_lengths(features), lengths)  # last real step is non-zero
        if task == "regression":
            assert split.labels.dtype == np.float32
            assert split.labels.min() >= -3.0 and split.labels.max() <= 3.0
        else:
            assert split.labels.dtype == np.int64
            assert split.labels.min() >= 0 and split.labels.max() < 20
    if task == "classification":
        assert dataset.class_names == MINTREC_INTENTS
