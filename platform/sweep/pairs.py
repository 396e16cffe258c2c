"""A sweep's datasets, each loaded once with its one name, and its (model, dataset) pairs.

A dataset's name (its `DatasetRecord`'s) is the sweep's mapping key, else the file's own name,
else its stem; it is then the name of everything made from it: the pair ``<model>-<name>``, which
is also the Optuna study, its run-directory folders and its MLflow run, the registered model
``msa-<model>-<name>``, the leaderboard section. Two datasets of one name would share all of
that, so they are refused before anything starts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from msa.models.registry import get_entry
from msa.platform.core.errors import MsaError
from msa.platform.core.metrics import METRIC_MODES, SUITE_METRICS
from msa.platform.core.run_dir import RunDir, pair_name
from msa.platform.data.features import FeatureSet
from msa.platform.data.readers import load_dataset, write_mmsa_pickle
from msa.platform.data.synth import synthesize
from msa.platform.sweep.config import BUILTIN_DATASETS, DATASET_NAME, SweepConfig


@dataclass(frozen=True)
class Pair:
    """One (model, dataset) study of a sweep."""

    name: str  # <model>-<dataset>: the study, its run-directory folders, its MLflow run
    model: str
    dataset: str
    metric: str  # the valid metric that selects

    @property
    def mode(self) -> str:
        return METRIC_MODES[self.metric]


def load_datasets(config: SweepConfig, run_dir: RunDir | None) -> dict[str, FeatureSet]:
    """Every dataset by name, loaded once. Built-ins are generated (or, on resume, re-read from
    the run directory); paths are read as given.

    Raises:
        MsaError: two datasets of one name (naming both and the fix), a name that cannot name
            files, or what `load_dataset` raises."""
    datasets: dict[str, FeatureSet] = {}
    for given, where in config.dataset_entries():
        if where not in BUILTIN_DATASETS:
            dataset = load_dataset(where, name=given)
        elif run_dir is not None and run_dir.builtin_dataset(where).is_file():
            dataset = load_dataset(run_dir.builtin_dataset(where), name=given or where)
        else:
            dataset = synthesize(where.removeprefix("synth_"), seed=0)
            if given:
                dataset = dataclasses.replace(dataset, record=dataclasses.replace(dataset.record, name=given),
                                              validate=False)
        name = dataset.name
        if name in datasets:
            first = datasets[name].source or _builtin_label(config, name)
            raise MsaError(f"datasets {first} and {dataset.source or where} are both named {name!r}; give each its own "
                           f"name with a mapping, e.g. datasets: {{{name}_a: {first}, {name}_b: {dataset.source or where}}}")
        if not DATASET_NAME.fullmatch(name):
            raise MsaError(f"dataset {dataset.source} is named {name!r}, which cannot name files and registered models; "
                           f"name it with a mapping, e.g. datasets: {{my_data: {dataset.source}}}")
        datasets[name] = dataset
    return datasets


def _builtin_label(config: SweepConfig, name: str) -> str:
    return next(where for given, where in config.dataset_entries() if (given or where) == name)


def sweep_pairs(config: SweepConfig, datasets: dict[str, FeatureSet]) -> dict[str, Pair]:
    """Every pair by name, in the sweep's order (models, then datasets)."""
    return {pair_name(model, name): Pair(pair_name(model, name), model, name, config.selection_metric(dataset.metric_suite))
            for model in config.models for name, dataset in datasets.items()}


def check_models_fit_data(pairs: dict[str, Pair], datasets: dict[str, FeatureSet], *, text_encoder: bool) -> None:
    """Every pair can run: the selection metric exists in its dataset's suite, and its model gets
    at least the modalities it needs (`text_encoder`: text comes from the clips' words).

    Raises:
        MsaError: naming the dataset (and model).
    """
    for pair in pairs.values():
        dataset = datasets[pair.dataset]
        if pair.metric not in SUITE_METRICS[dataset.metric_suite]:
            raise MsaError(
                f"unknown metric {pair.metric!r} for dataset {pair.dataset!r} ({dataset.metric_suite} metrics: "
                f"{', '.join(SUITE_METRICS[dataset.metric_suite])})"
            )
        modalities = (*dataset.modalities, "text") if text_encoder else dataset.modalities
        get_entry(pair.model).require_modalities(pair.model, tuple(dict.fromkeys(modalities)),
                                                 what=f"dataset {pair.dataset!r}" + (f" ({dataset.source})" if dataset.source else ""))


def saved_builtin(dataset: FeatureSet, where: str, run_dir: RunDir) -> FeatureSet:
    """A generated dataset written into the run directory (once), as read back from there: trials
    and resumes read that file, whose SHA-256 is the one the generator recorded."""
    path = run_dir.builtin_dataset(where)
    if not path.exists():
        write_mmsa_pickle(dataset, path)
    return dataclasses.replace(dataset, record=dataclasses.replace(dataset.record, path=str(Path(path).resolve())),
                               validate=False)
