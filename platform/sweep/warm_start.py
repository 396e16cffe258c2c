"""Warm starts (`search.warm_start`): a new study learns from the studies of earlier sweeps.

Every study records the task it optimises (`TaskFacts`: model, dataset name and SHA-256,
selection metric, text input) as a study user attribute. For each pair of a new sweep, every
earlier study of the same model seeds the new one:

- **Same task** (dataset SHA-256, metric and text input equal): its finished trials, COMPLETE
  and PRUNED with their intermediate values, are added to the new study as evaluated trials,
  marked `CARRIED_ATTR`. The sampler reads them as it reads the sweep's own; nothing else does:
  the budget, the summary, registration and the ensembles see `own_trials` only (a carried trial
  has no checkpoint in this run). A parameter the new space does not search is dropped from the
  trial, and so is a value outside the new space's range or choices: the trial was not evaluated
  at any point of the new space for that parameter, so it informs the others only.
- **Another task** (other data, metric or text input, or a study made before studies recorded
  their task): its best `top_k` configs are queued as the new study's first trials, clipped
  into the new space (`Param.clipped`); a searched parameter they lack takes the model's default.

Only an earlier study's own trials are read, so warm-starting from a sweep and from the sweep it
warm-started from never carries a trial twice. Runs in the driver.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState, create_trial

from msa.platform.core.errors import MsaError
from msa.platform.core.run_dir import LAYOUT, RunDir
from msa.platform.sweep.search_space import NAME_SEPARATOR, SearchSpace

FACTS_ATTR = "msa_task"  # study user attribute: the TaskFacts the study optimises
CARRIED_ATTR = "msa_carried_from"  # trial user attribute: "<run dir>:<study>#<trial number>"
SCORED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True)
class TaskFacts:
    """What a study's values mean: two studies' scores compare only when these are equal
    (the dataset's name may differ; its SHA-256 may not)."""

    model: str
    dataset: str
    dataset_sha256: str
    metric: str
    text_encoder: str  # the encoder's absolute path; "" for the data's text features

    def same_task(self, other: "TaskFacts") -> bool:
        return (self.model, self.dataset_sha256, self.metric, self.text_encoder) == \
            (other.model, other.dataset_sha256, other.metric, other.text_encoder)

    def record(self, study: optuna.Study) -> None:
        study.set_user_attr(FACTS_ATTR, asdict(self))


def own_trials(study: optuna.Study, states: tuple[TrialState, ...] | None = None) -> list[FrozenTrial]:
    """The study's trials that this sweep ran (or queued), without those carried from earlier sweeps."""
    return [t for t in study.get_trials(deepcopy=False, states=states) if CARRIED_ATTR not in t.user_attrs]


@dataclass(frozen=True)
class EarlierStudy:
    """A finished or unfinished study of an earlier sweep, read once."""

    run_dir: Path
    name: str
    model: str
    facts: TaskFacts | None  # None: made before studies recorded their task
    minimize: bool
    trials: tuple[FrozenTrial, ...]  # its own trials with a score

    @property
    def label(self) -> str:
        return f"{self.run_dir}:{self.name}"


def read_earlier_studies(paths: list[str], models: list[str]) -> list[EarlierStudy]:
    """The studies of `models` in the run directories `paths`.

    Raises:
        MsaError: a path that is not a sweep run directory, one of a layout this version does
            not know, or one holding no study of any of `models`.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    studies = []
    for path in paths:
        run_dir = RunDir(Path(path).expanduser())
        if not run_dir.is_sweep():
            raise MsaError(f"search.warm_start: {path} is not a sweep run directory (no {run_dir.config_file.name})")
        if run_dir.layout() > LAYOUT:
            raise MsaError(f"search.warm_start: {path} has run-directory layout {run_dir.layout()}, made by msa-sweep "
                           f"{run_dir.layout_version()}; this version reads layouts up to {LAYOUT}")
        found = [study for db in run_dir.study_dbs() if (study := _read_study(run_dir, db.stem, models)) is not None]
        if not found:
            held = ", ".join(db.stem for db in run_dir.study_dbs()) or "none"
            raise MsaError(f"search.warm_start: {path} holds no study of {', '.join(models)} (its studies: {held})")
        studies += found
    return studies


def _read_study(run_dir: RunDir, name: str, models: list[str]) -> EarlierStudy | None:
    storage = run_dir.study_url(name)
    if name not in optuna.get_all_study_names(storage):  # interrupted before its study was written
        return None
    study = optuna.load_study(study_name=name, storage=storage)
    recorded = study.user_attrs.get(FACTS_ATTR)
    facts = TaskFacts(**recorded) if recorded else None
    model = facts.model if facts else next((m for m in models if name.startswith(f"{m}-")), None)
    if model not in models:
        return None
    scored = tuple(t for t in own_trials(study, SCORED) if t.value is not None and t.value == t.value)
    return EarlierStudy(run_dir=run_dir.root, name=name, model=model, facts=facts,
                        minimize=study.direction == optuna.study.StudyDirection.MINIMIZE, trials=scored)


@dataclass
class WarmStart:
    """What one new study gets from the earlier ones: `carried` trials to add, `queued` configs
    to evaluate first, and a line per source saying which and what was left out."""

    carried: list[FrozenTrial] = field(default_factory=list)
    queued: list[dict[str, Any]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.carried or self.queued)

    def tags(self) -> dict[str, str]:
        """The study's MLflow run tags."""
        return {"msa.warm_start.carried": str(len(self.carried)), "msa.warm_start.queued": str(len(self.queued)),
                "msa.warm_start.from": "; ".join(self.sources)[:5000]}


def plan_warm_start(earlier: list[EarlierStudy], facts: TaskFacts, space: SearchSpace, default_point: dict[str, Any],
                    *, top_k: int, budget: int) -> WarmStart:
    """What the new study of `facts` (searching `space`) gets from `earlier` (see the module
    docstring); at most `budget` configs are queued, in the order of `earlier`."""
    distributions = space.optuna_space()
    params = {p.name.replace(".", NAME_SEPARATOR): p for p in space.params if p.type != "fixed"}
    warm = WarmStart()
    for study in earlier:
        if study.model != facts.model or not study.trials:
            continue
        if study.facts is not None and study.facts.same_task(facts):
            left_out: dict[str, int] = {}
            for trial in study.trials:
                warm.carried.append(_carried(study, trial, distributions, left_out))
            dropped = ", ".join(f"{name} in {n}" for name, n in sorted(left_out.items()))
            warm.sources.append(f"{study.label}: {len(study.trials)} trials carried"
                                + (f" (values this space cannot hold, left out: {dropped})" if dropped else ""))
        else:
            best = sorted(study.trials, key=lambda t: t.value if study.minimize else -t.value)[:top_k]
            for trial in best:
                warm.queued.append({**default_point, **{name: params[name].clipped(value)
                                                         for name, value in trial.params.items() if name in params}})
            why = "a study made before studies recorded their task" if study.facts is None else _difference(study.facts, facts)
            warm.sources.append(f"{study.label}: best {len(best)} configs queued ({why})")
    if len(warm.queued) > budget:
        warm.sources.append(f"only the first {budget} queued configs run: the budget is {budget} trials")
        warm.queued = warm.queued[:budget]
    return warm


def _carried(study: EarlierStudy, trial: FrozenTrial, distributions: dict, left_out: dict[str, int]) -> FrozenTrial:
    params, kept = {}, {}
    for name, value in trial.params.items():
        distribution = distributions.get(name)
        if distribution is not None and _holds(distribution, value):
            params[name], kept[name] = value, distribution
        else:
            left_out[name] = left_out.get(name, 0) + 1
    return create_trial(state=trial.state, value=trial.value, params=params, distributions=kept,
                        intermediate_values=dict(trial.intermediate_values),
                        user_attrs={CARRIED_ATTR: f"{study.label}#{trial.number}"})


def _holds(distribution, value: Any) -> bool:
    try:
        return distribution._contains(distribution.to_internal_repr(value))
    except (ValueError, TypeError):  # a categorical value that is not one of the choices
        return False


def _difference(earlier: TaskFacts, new: TaskFacts) -> str:
    if earlier.dataset_sha256 != new.dataset_sha256:
        return f"other data: {earlier.dataset} SHA-256 {earlier.dataset_sha256[:12]}..."
    if earlier.metric != new.metric:
        return f"selected on valid {earlier.metric}"
    return f"text from {earlier.text_encoder or 'the data features'}"
