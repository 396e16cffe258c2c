"""A fitted ensemble as an MLflow pyfunc model: ``msa-ensemble-<dataset>``.

Its artifacts are the member checkpoint folders and ``ensemble.json``: the task, the member groups
(a group is one or more checkpoints whose predictions are averaged: a single trial, a seed
ensemble's seeds, or a member's K out-of-fold models) and the meta-learner's combiner (see
`meta_learners.combine`, numpy only). It takes every input its members read (the union of their
signatures: text features, raw text, or both), so `msa predict --model
models:/msa-ensemble-<dataset>@champion` works like it does for a trial.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from mlflow.models import ModelSignature
from mlflow.types.schema import Schema

from msa.ensembles.meta_learners import combine
from msa.platform.core.compat import untyped_python_model
from msa.platform.tracking.registry import LoadedCheckpoint, checkpoint_signature, mean_prediction, register_pyfunc
from msa.platform.training.checkpoint import Checkpoint

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


def register_ensemble(uri: str, run_id: str, name: str, groups: list[list[Path]], combiner: dict, task: str,
                      tags: dict[str, str]) -> str:
    """Log and register an ensemble of checkpoint `groups` combined by `combiner`; returns the version."""
    artifacts: dict[str, str] = {}
    keys = []
    for number, group in enumerate(groups):
        keys.append([])
        for position, folder in enumerate(group):
            key = f"member{number}_{position}"
            artifacts[key] = str(folder)
            keys[-1].append(key)
    signature = members_signature([Checkpoint(folder) for group in groups for folder in group])
    with tempfile.TemporaryDirectory() as scratch:
        description = Path(scratch) / DESCRIPTION
        description.write_text(json.dumps({"task": task, "groups": keys, "combiner": combiner}, indent=2))
        artifacts["description"] = str(description)
        return register_pyfunc(uri, run_id, name, tags, python_model=EnsembleModel(), artifacts=artifacts,
                               signature=signature)


def members_signature(checkpoints: list[Checkpoint]) -> ModelSignature:
    """Every input some member reads (text features and raw text both, when members differ)."""
    signatures = [checkpoint_signature(checkpoint) for checkpoint in checkpoints]
    inputs = {tensor.name: tensor for signature in signatures for tensor in signature.inputs.inputs}
    return ModelSignature(inputs=Schema(list(inputs.values())), outputs=signatures[0].outputs)
