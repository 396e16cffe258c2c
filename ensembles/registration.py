"""Registering a fitted ensemble as ``msa-ensemble-<dataset>``: its member checkpoints and
``ensemble.json`` as the artifacts of an `EnsembleModel` pyfunc, under the registry's alias policy
(`msa.platform.tracking.aliases`). It takes every input its members read (the union of their
signatures: text features, raw text, or both), so `msa predict --model
models:/msa-ensemble-<dataset>@champion` works like it does for a trial.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from mlflow.models import ModelSignature
from mlflow.types.schema import Schema

from msa.ensembles.ensemble_model import DESCRIPTION, EnsembleModel
from msa.platform.tracking.registry import Registered, checkpoint_signature, register_pyfunc
from msa.platform.training.checkpoint import Checkpoint


def register_ensemble(uri: str, run_id: str, name: str, groups: list[list[Path]], combiner: dict, task: str,
                      tags: dict[str, str]) -> Registered:
    """Log and register an ensemble of checkpoint `groups` combined by `combiner`."""
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
