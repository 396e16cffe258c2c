"""A fitted ensemble as an MLflow pyfunc model: ``msa-ensemble-<dataset>``; its serving path.

Its artifacts are the member checkpoint folders and ``ensemble.json``: the task, the member groups
(a group is one or more checkpoints whose predictions are averaged: a single trial, a seed
group's or seed ensemble's seeds, or a member's K out-of-fold models) and the meta-learner's
combiner (see `combiner.combine`, numpy only). A registered ensemble carries this module and what
it imports (`msa.platform.tracking.code_paths`), so it loads without msa-sweep installed;
`registration.py` registers it.

Runs in whichever process loads a registered ensemble (`msa predict`, a serving process).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from msa.ensembles.combiner import combine
from msa.platform.core.compat import untyped_python_model
from msa.platform.tracking.pyfunc import LoadedCheckpoint, mean_prediction

DESCRIPTION = "ensemble.json"


class EnsembleModel(untyped_python_model()):
    """Member checkpoints + combiner: ``predict({modality: (N,T,d), modality_lengths: (N,)})``."""

    def load_context(self, context) -> None:
        description = json.loads(Path(context.artifacts["description"]).read_text())
        self.combiner = description["combiner"]
        self.groups = [[LoadedCheckpoint(Path(context.artifacts[key])) for key in group] for group in description["groups"]]

    def predict(self, context, model_input, params=None):
        columns = [mean_prediction(group, model_input) for group in self.groups]
        return combine(self.combiner, np.stack(columns, axis=1))
