"""The sweep config: what `msa sweep CONFIG` reads (`sweeps/*.yaml`), typed and validated up front.

Everything is checked before Ray starts: unknown keys (naming file and key), unknown models or
datasets, metrics the datasets do not have, resources no node could ever give, impossible
budgets. ``key=value`` overrides use dotted paths (``budget.trials_per_pair=4``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from msa.models.registry import build_model_config, get_entry
from msa.platform.core.config import build_dataclass, load_yaml_mapping, merge, parse_overrides
from msa.platform.core.errors import MsaError
from msa.platform.core.metrics import DEFAULT_SELECTION_METRIC, METRIC_MODES
from msa.platform.sweep.cluster import TRIAL_SLOT
from msa.platform.sweep.search_space import load_search_space
from msa.platform.tracking.server import require_http
from msa.platform.training.config import SWEEP_OWNED, resolve_config

# Datasets a sweep can name without a path: generated deterministically into the run directory.
BUILTIN_DATASETS = ("synth_regression", "synth_classification")
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class BudgetConfig:
    """How much to spend per (model, dataset) pair.

    Args:
        trials_per_pair: Optuna trials per pair.
        seeds_per_trial: seeds each trial's config is trained with (``search.seed`` onwards: the
            same seeds for every config). A trial is then a seed group: one Tune trial training
            its seeds in lock-step in one slot, reporting their mean, which is all Optuna and
            ASHA see; it is one ensemble member and, for the best, the registered model.
        max_epochs: epochs a trial may run (ASHA's max_t).
        time_budget_s: optional wall-clock budget per pair, counted from its first trial in this
            driver (a resumed sweep counts again): no trial of the pair starts after it, and the
            ones running finish (as Optuna's ``timeout`` does). The study records that it ran out.
        max_trial_seconds: with ``search.budget_unit: seconds``, ASHA's maximum: the training
            seconds after which it stops a trial (which also ends at ``max_epochs``).
    """

    trials_per_pair: int = 8
    seeds_per_trial: int = 1
    max_epochs: int = 20
    time_budget_s: float | None = None
    max_trial_seconds: float | None = None


@dataclass
class SearchConfig:
    """How trials are proposed, stopped and compared.

    Args:
        sampler: ``tpe`` (Optuna's TPE) or ``random``.
        seed: sampler seed; trial seeds derive from it too.
        scheduler: ``asha`` (early stopping of weak trials) or ``none``.
        metric: valid metric that selects (``""``: MAE for regression, accuracy for classification).
        mode: ``min`` or ``max``; must agree with the metric when given.
        grace_period: what every trial gets before ASHA may stop it, in `budget_unit`.
        reduction_factor: ASHA's rung ratio.
        spaces: per model, a search-space YAML to use instead of `search_spaces/<model>.yaml`.
        defaults_first: a new study's first trial is the model's default config, clipped into
            its search space (false: every trial is the sampler's). A warm start replaces it.
        warm_start: earlier sweeps' run directories; each new study learns from their studies of
            the same model: on the same task (dataset SHA-256, selection metric, text input) their
            finished trials are added as evaluated trials the sampler reads (they count neither
            against the budget nor as this sweep's trials); otherwise their best configs are
            queued as the first trials.
        warm_start_top_k: configs queued from each earlier study of another task.
        budget_unit: what ASHA counts: ``epochs`` (its rungs and grace period in epochs, its
            maximum ``budget.max_epochs``) or ``seconds`` (in training seconds, Ray's
            ``time_total_s``, its maximum ``budget.max_trial_seconds``): an epoch of a cheap
            config (more frozen encoder layers, a smaller model) then costs less of the search.
    """

    sampler: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    scheduler: Literal["asha", "none"] = "asha"
    metric: str = ""
    mode: Literal["min", "max"] | None = None
    grace_period: int = 2
    reduction_factor: int = 2
    spaces: dict[str, str] = field(default_factory=dict)
    defaults_first: bool = True
    warm_start: list[str] = field(default_factory=list)
    warm_start_top_k: int = 3
    budget_unit: Literal["epochs", "seconds"] = "epochs"


@dataclass
class ResourcesConfig:
    """What each trial gets: `workers_per_trial` data-parallel workers of this size.

    Args:
        workers_per_trial: DeepSpeed data-parallel ranks per trial (Ray Train workers).
        cpus_per_worker, gpus_per_worker: each rank's share of a node.
        max_concurrent_trials: trials running at once, all pairs together.
        max_trials_per_pair: optional cap on one pair's trials running at once.
        schedule: ``concurrent``: every pair's study runs on the shared slots at once; a free
            slot goes to the first pair (in the order of ``models`` x ``datasets``) that has
            trials left and is under its cap, so the first studies finish as early as they
            would alone and the slots they leave idle go to the next. ``sequential``: one study
            after another (a study's last trials run alone, the next waits).
        max_failures: retries of a failed trial (from its last checkpoint) before it counts as failed.
        inline_single_worker: run a one-worker trial's DeepSpeed loop inside the Tune trial actor
            (a one-rank process group) instead of a Ray Train controller plus one worker actor:
            the same training, two fewer processes to start per trial. ``false`` always uses
            Ray Train's TorchTrainer.
        worker_resources: custom Ray resources each worker needs besides CPUs and GPUs, e.g.
            ``{accelerator_type:H100: 0.001}`` or a label your nodes declare.
        placement: how a trial's workers are placed (Ray's placement strategies): ``PACK`` (as
            few nodes as possible, the default), ``STRICT_PACK`` (one node: NVLink, no network
            between ranks), ``SPREAD`` or ``STRICT_SPREAD`` (one worker per node).
    """

    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_concurrent_trials: int = 1
    max_trials_per_pair: int | None = None
    schedule: Literal["concurrent", "sequential"] = "concurrent"
    max_failures: int = 1
    inline_single_worker: bool = True
    worker_resources: dict[str, float] = field(default_factory=dict)
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


@dataclass
class DeepSpeedSettings:
    """How every trial runs DeepSpeed.

    Args:
        zero_stage: ZeRO stage: 0 (plain data parallel), 1 (optimizer states partitioned
            across a trial's ranks), 2 (and gradients), 3 (and parameters: for large encoders).
        precision: ``auto`` (bf16 on GPU, fp32 on CPU), ``fp32`` or ``bf16`` (GPU only).
    """

    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"


@dataclass
class TrackingConfig:
    """Where the sweep logs.

    Args:
        uri: an MLflow tracking server (``http://host:port``), checked before any trial starts;
            empty: the sweep runs its own server on 127.0.0.1 over ``<run dir>/mlflow/``.
    """

    uri: str = ""


@dataclass
class SweepConfig:
    """A whole sweep: every model on every dataset, one Optuna study per pair.

    Args:
        name: the sweep's name (run directory prefix).
        datasets: built-in names (synth_regression, synth_classification) or paths; or a mapping
            of dataset names to those (``{mosi: MOSI/unaligned_50.pkl, mosei: MOSEI/unaligned_50.pkl}``).
            A dataset's name is its key, else the file's own name (an npz's ``meta_json`` name),
            else its file stem; it names the dataset's pairs, studies, registered models and
            leaderboard sections, so two datasets of one name are refused.
        models: registered model names.
        storage: folder under which each sweep gets its run directory; on a multi-node cluster
            a filesystem mounted at the same path on every node (checked before trials start).
        train: fixed TrainConfig overrides for every trial (e.g. ``patience``).
        tracking: the MLflow server to log to (default: one the sweep starts itself).
        ensemble: how `msa ensemble` / `msa run` stack the trials afterwards: the fields of
            `msa.ensembles.config.EnsembleConfig`, checked by the job that reads the sweep config
            (the ensembles sit above the sweep, which never reads this section).
    """

    name: str = "sweep"
    datasets: list[str] | dict[str, str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: str = "runs/sweeps"
    train: dict[str, Any] = field(default_factory=dict)
    ensemble: dict[str, Any] = field(default_factory=dict)

    def selection_metric(self, suite: str) -> str:
        return self.search.metric or DEFAULT_SELECTION_METRIC[suite]

    def dataset_entries(self) -> list[tuple[str | None, str]]:
        """``(given name or None, path or built-in)`` per dataset, in the config's order."""
        if isinstance(self.datasets, dict):
            return list(self.datasets.items())
        return [(None, where) for where in self.datasets]


def load_sweep_config(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Read, merge overrides into, and validate a sweep config."""
    raw = merge(load_yaml_mapping(path), parse_overrides(overrides or []))
    where = f"{path}" + (" + command-line overrides" if overrides else "")
    return validate_sweep_config(build_dataclass(SweepConfig, raw, where=where), where=where)


def _check_budget_unit(config: SweepConfig, where: str) -> None:
    """ASHA's grace period and maximum, in the unit it counts."""
    budget, search = config.budget, config.search
    if search.budget_unit == "epochs":
        if budget.max_trial_seconds is not None:
            raise MsaError(f"{where}: budget.max_trial_seconds is read only with search.budget_unit: seconds")
        if search.scheduler == "asha" and search.grace_period > budget.max_epochs:  # only ASHA reads it
            raise MsaError(f"{where}: search.grace_period ({search.grace_period}) exceeds budget.max_epochs ({budget.max_epochs})")
        return
    if search.scheduler != "asha":
        raise MsaError(f"{where}: search.budget_unit: seconds counts ASHA's rungs; it needs search.scheduler: asha")
    if budget.max_trial_seconds is None or budget.max_trial_seconds <= 0:
        raise MsaError(f"{where}: search.budget_unit: seconds needs budget.max_trial_seconds > 0 (ASHA's maximum, "
                       f"in training seconds)")
    if search.grace_period > budget.max_trial_seconds:
        raise MsaError(f"{where}: search.grace_period ({search.grace_period} s) exceeds budget.max_trial_seconds "
                       f"({budget.max_trial_seconds:g} s)")


def validate_sweep_config(config: SweepConfig, *, where: str) -> SweepConfig:
    """Checks that need more than types; raises MsaError naming `where`."""
    if not config.datasets:
        raise MsaError(f"{where}: 'datasets' is empty; name at least one dataset or path")
    if not config.models:
        raise MsaError(f"{where}: 'models' is empty; name at least one registered model")
    for model in config.models:
        try:
            get_entry(model)
        except MsaError as exc:
            raise MsaError(f"{where}: {exc}") from None
    for name, dataset in config.dataset_entries():
        if name is not None and not DATASET_NAME.fullmatch(name):
            raise MsaError(f"{where}: dataset name {name!r} must be letters, digits, '_', '.' or '-' (it names files "
                           f"and registered models)")
        if dataset not in BUILTIN_DATASETS and not Path(dataset).exists():
            raise MsaError(
                f"{where}: dataset {dataset!r} is neither a built-in ({', '.join(BUILTIN_DATASETS)}) nor an existing path"
            )
    budget, search, resources = config.budget, config.search, config.resources
    for label, value, low in (
        ("budget.trials_per_pair", budget.trials_per_pair, 1), ("budget.seeds_per_trial", budget.seeds_per_trial, 1),
        ("budget.max_epochs", budget.max_epochs, 1),
        ("search.grace_period", search.grace_period, 1), ("search.reduction_factor", search.reduction_factor, 2),
        ("search.warm_start_top_k", search.warm_start_top_k, 1),
        ("resources.workers_per_trial", resources.workers_per_trial, 1),
        ("resources.max_concurrent_trials", resources.max_concurrent_trials, 1),
        ("resources.max_failures", resources.max_failures, 0),
    ):
        if value < low:
            raise MsaError(f"{where}: {label} must be >= {low}, got {value}")
    if resources.max_trials_per_pair is not None and resources.max_trials_per_pair < 1:
        raise MsaError(f"{where}: resources.max_trials_per_pair must be >= 1 (or null), got {resources.max_trials_per_pair}")
    if resources.cpus_per_worker <= 0 or resources.gpus_per_worker < 0:
        raise MsaError(f"{where}: resources need cpus_per_worker > 0 and gpus_per_worker >= 0")
    for name, amount in resources.worker_resources.items():
        if name in ("CPU", "GPU", TRIAL_SLOT) or isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
            raise MsaError(f"{where}: resources.worker_resources.{name} must be a custom resource with an amount > 0 "
                           f"(CPU and GPU have their own keys; trial_slot is the sweep's own)")
    if "://" in config.storage:
        raise MsaError(
            f"{where}: storage {config.storage!r} is a URI; it must be a filesystem path (the run directory holds an "
            f"SQLite Optuna study and checkpoint folders read as files). On a cluster, mount shared storage "
            f"(EFS, NFS, FSx) at the same path on every node and give that path"
        )
    _check_budget_unit(config, where)
    if budget.time_budget_s is not None and budget.time_budget_s <= 0:
        raise MsaError(f"{where}: budget.time_budget_s must be > 0 (or null), got {budget.time_budget_s}")
    if search.mode and not search.metric:
        raise MsaError(f"{where}: search.mode needs search.metric (the default metric implies its mode)")
    if search.metric:
        if search.metric not in METRIC_MODES:
            raise MsaError(f"{where}: unknown metric {search.metric!r}; known: {', '.join(METRIC_MODES)}")
        if search.mode and search.mode != METRIC_MODES[search.metric]:
            raise MsaError(
                f"{where}: search.mode {search.mode!r} contradicts {search.metric} (better is {METRIC_MODES[search.metric]})"
            )
    unknown = sorted(set(search.spaces) - set(config.models))
    if unknown:
        raise MsaError(f"{where}: search.spaces names {unknown[0]!r}, which is not in 'models'")
    for model, path in search.spaces.items():
        try:
            space = load_search_space(model, path)
        except MsaError as exc:
            raise MsaError(f"{where}: search.spaces.{model}: {exc}") from None
        if not space.optuna_space():
            raise MsaError(f"{where}: search.spaces.{model}: {path} fixes every parameter, so there is nothing to search; "
                           "search at least one (a range or choices), or train one config with `msa train`")
    if config.tracking.uri:
        try:
            require_http(config.tracking.uri, "tracking.uri")
        except MsaError as exc:
            raise MsaError(f"{where}: {exc}") from None
    owned = [key for key in SWEEP_OWNED if key in config.train]
    if owned:
        raise MsaError(f"{where}: train.{owned[0]} is set by the sweep itself; remove it")
    trial = resolve_config({**config.train, "model": config.models[0], "data": "-"}, where=f"{where}: train")
    for model in config.models:
        build_model_config(model, trial.model_config, where=f"{where}: train.model_config for {model}")
    return config

