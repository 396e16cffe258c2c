"""`PredictionMatrix`: the members' predictions on one split, aligned by clip id.

Everything an ensemble is fitted on or scored with is one of these. It carries the name of the
split it came from, so that a meta-learner can refuse to be fitted on test (see
`meta_learners.MetaLearner.fit`), and a row subset keeps that name: folds of valid are still valid.

Example:
    >>> import numpy as np
    >>> m = PredictionMatrix(split="valid", ids=("a_1", "a_2"), labels=np.array([0.5, -1.0]),
    ...                      predictions=np.array([[0.4, 0.7], [-0.8, -1.2]]), members=("m0", "m1"),
    ...                      task="regression")
    >>> m.subset(np.array([1])).ids
    ('a_2',)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TEST_SPLIT = "test"


@dataclass(frozen=True)
class PredictionMatrix:
    """Member predictions on one split.

    Args:
        split: where the rows come from ("valid", "test", "oof" for out-of-fold train+valid).
        ids: clip ids, one per row.
        labels: truth, ``(N,)`` floats (regression) or class ids (classification).
        predictions: ``(N, M)`` scores (regression) or ``(N, M, C)`` class probabilities.
        members: member names, one per column.
        task: ``regression`` or ``classification``.
    """

    split: str
    ids: tuple[str, ...]
    labels: np.ndarray
    predictions: np.ndarray
    members: tuple[str, ...]
    task: str

    def __post_init__(self) -> None:
        expected_ndim = 3 if self.task == "classification" else 2
        if self.predictions.ndim != expected_ndim:
            raise ValueError(f"{self.task} predictions must have {expected_ndim} dimensions, "
                             f"got shape {self.predictions.shape}")
        if self.predictions.shape[:2] != (len(self.ids), len(self.members)) or len(self.labels) != len(self.ids):
            raise ValueError(f"predictions {self.predictions.shape} do not match {len(self.ids)} ids, "
                             f"{len(self.labels)} labels and {len(self.members)} members")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def is_test(self) -> bool:
        return self.split == TEST_SPLIT

    def subset(self, rows: np.ndarray) -> "PredictionMatrix":
        """The given rows (indices or a boolean mask); same split, same members."""
        rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows, dtype=np.int64)
        return PredictionMatrix(self.split, tuple(self.ids[i] for i in rows), self.labels[rows],
                                self.predictions[rows], self.members, self.task)

    def select(self, columns: list[int]) -> "PredictionMatrix":
        """The given members (columns), in that order."""
        return PredictionMatrix(self.split, self.ids, self.labels, self.predictions[:, columns],
                                tuple(self.members[i] for i in columns), self.task)
