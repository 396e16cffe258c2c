"""`EnsembleConfig`: how `msa ensemble` (and `msa run`) stack a sweep's trials; the fields of a
sweep config's `ensemble:` section, validated in full before any work starts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from msa.ensembles.meta_learners import META_LEARNERS
from msa.platform.core.config import build_dataclass
from msa.platform.core.errors import MsaError


@dataclass
class EnsembleConfig:
    """How `msa ensemble` (and `msa run`) build stacked ensembles from a sweep's trials.

    Args:
        top_k: per dataset, the best trials of each model (by the valid selection metric) that
            become members.
        learners: meta-learners to fit (empty: every one that suits the task: mean, nnls,
            ridge or logistic, caruana).
        protocol: ``crossfit`` (fit on the members' valid predictions; valid score cross-fitted
            over grouped folds) or ``oof`` (retrain each member's config on K grouped folds of
            train+valid and stack on the out-of-fold predictions: K retrainings per member).
        folds: K for cross-fitting and for the out-of-fold protocol.
        seeds: the seed ensemble averages the best single model's own seeds (one, or its seed
            group's) and ``seeds - 1`` more runs of its config, retrained with the next seeds.
        caruana_steps: greedy steps of Caruana selection.
        bootstrap: resamples behind each paired 95% interval.
        seed: seeds the folds, the bootstrap and Caruana's tie-breaking.
        register: register the best ensemble as ``msa-ensemble-<dataset>`` (champion if it beats the current one on valid, else challenger).
    """

    top_k: int = 5
    learners: list[str] = field(default_factory=list)
    protocol: Literal["crossfit", "oof"] = "crossfit"
    folds: int = 5
    seeds: int = 3
    caruana_steps: int = 25
    bootstrap: int = 1000
    seed: int = 0
    register: bool = True


def validate_ensemble_config(config: EnsembleConfig, *, where: str) -> EnsembleConfig:
    """Checks that need more than types; raises MsaError naming `where`."""
    for label, value, low in (("top_k", config.top_k, 1), ("folds", config.folds, 2), ("seeds", config.seeds, 2),
                              ("caruana_steps", config.caruana_steps, 1), ("bootstrap", config.bootstrap, 100)):
        if value < low:
            raise MsaError(f"{where}: ensemble.{label} must be >= {low}, got {value}")
    unknown = [name for name in config.learners if name not in META_LEARNERS]
    if unknown:
        raise MsaError(f"{where}: unknown meta-learner {unknown[0]!r}; known: {', '.join(META_LEARNERS)}")
    return config


def ensemble_config(values: dict[str, Any] | EnsembleConfig, *, where: str) -> EnsembleConfig:
    """A validated `EnsembleConfig` from a mapping (a sweep config's `ensemble:` section, or
    the defaults with command-line flags on top); raises MsaError naming `where`."""
    config = values if isinstance(values, EnsembleConfig) else build_dataclass(EnsembleConfig, values, where=f"{where}: key 'ensemble'")
    return validate_ensemble_config(config, where=where)
