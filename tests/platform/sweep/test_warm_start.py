"""Warm starts (`search.warm_start`): what a new study takes from earlier studies, read from
real Optuna studies in run directories (no Ray), and a real sweep warm-started from the
session's reference sweep: carried trials are in the study the sampler reads, count neither
against the budget nor as the sweep's trials, and are never registered or ensemble members;
a study of other data starts from the earlier best configs."""
from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from helpers import run_finished, studies, sweep_config, sweep_yaml, versions_of
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from msa.ensembles.members import sweep_candidates
from msa.platform.cli import main
from msa.platform.core.errors import MsaError
from msa.platform.core.run_dir import LAYOUT, RunDir
from msa.platform.data.synth import synthesize
from msa.platform.sweep.config import load_sweep_config
from msa.platform.sweep.driver import trial_param_space
from msa.platform.sweep.search_space import load_search_space
from msa.platform.training.config import resolve_config
from msa.platform.sweep.warm_start import (
    CARRIED_ATTR,
    FACTS_ATTR,
    TaskFacts,
    own_trials,
    plan_warm_start,
    read_earlier_studies,
)
from msa.platform.tracking.client import PAIR_TAG, ROLE_TAG, RUN_DIR_TAG, TRIAL_TAG

TASK = TaskFacts(model="baseline", dataset="mosi", dataset_sha256="a" * 64, metric="mae", text_encoder="")
OLD_SPACE = {"lr": FloatDistribution(1e-5, 1e-1, log=True), "model_config/hidden": CategoricalDistribution([16, 32, 256]),
             "model_config/layers": CategoricalDistribution([1, 2])}
DEFAULTS = {"lr": 1e-3, "weight_decay": 1e-4, "batch_size": 32, "model_config/hidden": 64, "model_config/dropout": 0.1}


def old_trial(value: float, lr: float, hidden: int, *, pruned: bool = False) -> optuna.trial.FrozenTrial:
    return create_trial(state=TrialState.PRUNED if pruned else TrialState.COMPLETE, value=value,
                        params={"lr": lr, "model_config/hidden": hidden, "model_config/layers": 2},
                        distributions=OLD_SPACE, intermediate_values={1: value + 0.1, 2: value},
                        user_attrs={TRIAL_TAG: f"t{value}"})


def earlier_run_dir(folder: Path, studies_: dict[str, tuple[TaskFacts | None, list]], layout: int = LAYOUT) -> Path:
    """A run directory as an earlier sweep leaves it, as far as a warm start reads it."""
    run_dir = RunDir(folder)
    run_dir.optuna_dir.mkdir(parents=True)
    run_dir.config_file.write_text("name: old\n")
    run_dir.layout_file.write_text(f'{{"layout": {layout}, "msa_sweep": "0.{layout}.0"}}\n')
    for name, (facts, trials) in studies_.items():
        study = optuna.create_study(study_name=name, storage=run_dir.study_url(name))
        if facts is not None:
            facts.record(study)
        study.add_trials(trials)
    return run_dir.root


TRIALS = [old_trial(0.80, 3e-3, 32), old_trial(0.70, 2e-4, 256), old_trial(0.90, 5e-2, 16, pruned=True),
          old_trial(0.60, 1e-5, 32)]


def test_trials_of_the_same_task_are_carried_with_what_the_new_space_can_hold(tmp_path):
    """Same model, data SHA-256, metric and text input: every scored trial is carried with its
    state, value and epochs, marked with its source; a parameter the new space does not search
    (layers), or a value outside its range (lr 1e-5 < 1e-4) or choices (hidden 256), is left out
    of that trial, and the source line counts what was left out."""
    folder = earlier_run_dir(tmp_path / "old", {"baseline-mosi": (TASK, TRIALS)})
    earlier = read_earlier_studies([str(folder)], ["baseline"])
    warm = plan_warm_start(earlier, TASK, load_search_space("baseline"), DEFAULTS, top_k=2, budget=5)
    assert not warm.queued and len(warm.carried) == 4
    assert [(t.state, t.value, t.intermediate_values) for t in warm.carried] == \
        [(t.state, t.value, t.intermediate_values) for t in TRIALS]
    assert [t.params for t in warm.carried] == [{"lr": 3e-3, "model_config/hidden": 32}, {"lr": 2e-4}, {},
                                                {"model_config/hidden": 32}]
    assert [t.user_attrs for t in warm.carried] == [{CARRIED_ATTR: f"{folder}:baseline-mosi#{n}"} for n in range(4)]
    assert warm.sources == [f"{folder}:baseline-mosi: 4 trials carried (values this space cannot hold, left out: "
                            f"lr in 2, model_config/hidden in 2, model_config/layers in 4)"]
    assert warm.tags()["msa.warm_start.carried"] == "4"


def test_another_tasks_best_configs_are_queued_clipped_and_completed_with_the_defaults(tmp_path):
    """Other data (or a study that records no task): the best `top_k` configs by the earlier
    study's own direction, clipped into the new space, the rest of each point the defaults; the
    queue never holds more than the budget."""
    other = TaskFacts(model="baseline", dataset="mosei", dataset_sha256="b" * 64, metric="mae", text_encoder="")
    folder = earlier_run_dir(tmp_path / "old", {"baseline-mosei": (other, TRIALS), "baseline-legacy": (None, TRIALS[:2])})
    earlier = read_earlier_studies([str(folder)], ["baseline"])
    warm = plan_warm_start(earlier, TASK, load_search_space("baseline"), DEFAULTS, top_k=2, budget=3)
    assert not warm.carried
    assert warm.queued == [
        {**DEFAULTS, "lr": 2e-4, "model_config/hidden": 128},  # baseline-legacy's best (0.70): 256 -> nearest choice
        {**DEFAULTS, "lr": 3e-3, "model_config/hidden": 32},  # its second (0.80)
        {**DEFAULTS, "lr": 1e-4, "model_config/hidden": 32},  # baseline-mosei's best (0.60): lr 1e-5 -> low
    ]
    assert warm.sources == [
        f"{folder}:baseline-legacy: best 2 configs queued (a study made before studies recorded their task)",
        f"{folder}:baseline-mosei: best 2 configs queued (other data: mosei SHA-256 bbbbbbbbbbbb...)",
        "only the first 3 queued configs run: the budget is 3 trials",
    ]


def test_the_sampler_reads_carried_trials(tmp_path):
    """TPE, seeded alike, samples otherwise once a study holds carried trials: 20 of them (more
    than its 10 random start-up trials) with the best learning rate at 3e-3 move its next five
    suggestions towards 3e-3."""
    space = load_search_space("baseline")
    lrs = [10 ** (-4 + 1.69 * i / 19) for i in range(20)]
    trials = [create_trial(value=(math.log10(lr) - math.log10(3e-3)) ** 2, params={"lr": lr},
                           distributions={"lr": space.optuna_space()["lr"]}) for lr in lrs]
    folder = earlier_run_dir(tmp_path / "old", {"baseline-mosi": (TASK, trials)})
    warm = plan_warm_start(read_earlier_studies([str(folder)], ["baseline"]), TASK, space, DEFAULTS, top_k=1, budget=5)
    assert len(warm.carried) == 20

    def distance_of_next_five(carried: list) -> float:
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
        study.add_trials(carried)
        return sum(abs(math.log10(study.ask(space.optuna_space()).params["lr"] / 3e-3)) for _ in range(5))

    assert distance_of_next_five(warm.carried) < distance_of_next_five([]) / 2


@pytest.mark.parametrize("make, message", [
    (lambda f: f / "nowhere", r"is not a sweep run directory"),
    (lambda f: earlier_run_dir(f / "new", {}, layout=LAYOUT + 1), rf"has run-directory layout {LAYOUT + 1}"),
    (lambda f: earlier_run_dir(f / "tfn", {"tfn-mosi": (TaskFacts("tfn", "mosi", "a" * 64, "mae", ""), TRIALS)}),
     r"holds no study of baseline \(its studies: tfn-mosi\)"),
], ids=["not-a-run-directory", "newer-layout", "another-model"])
def test_a_warm_start_that_cannot_be_read_is_refused(tmp_path, make, message):
    with pytest.raises(MsaError, match=f"^search.warm_start: .*{message}"):
        read_earlier_studies([str(make(tmp_path))], ["baseline"])


def test_a_sweep_warm_started_from_the_reference_sweep(reference_sweep, mlflow_server, mlflow_client, tmp_path):
    """Baseline on the reference sweep's regression file under another name (same SHA-256,
    metric and text input: its 3 trials are carried; the name is not compared) and on the
    built-in regression set (other data: the reference study's best config is queued first). Each study holds its budget of own trials, which alone
    are summarised, registered and ensemble candidates; its MLflow run and the console say what
    was carried and from where."""
    reg_name, reg_path = next(iter(reference_sweep.data.items()))
    config = sweep_config(tmp_path, name="warm", models=["baseline"],
                          datasets={"same": str(reg_path), "fresh": "synth_regression"},
                          budget={"trials_per_pair": 2, "max_epochs": 2},
                          search={"seed": 5, "warm_start": [str(reference_sweep.run_dir)], "warm_start_top_k": 1},
                          resources={"max_concurrent_trials": 2}, tracking={"uri": mlflow_server.uri})
    warm = run_finished(config, lambda run_dir: {})
    reference = studies(reference_sweep.run_dir)[f"baseline-{reg_name}"]
    new = studies(warm.run_dir)

    same = new["baseline-same"]
    carried = [t for t in same.trials if CARRIED_ATTR in t.user_attrs]
    assert [(t.state, t.value, t.params) for t in carried] == \
        [(t.state, t.value, t.params) for t in reference.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(carried) == 3 and len(own_trials(same)) == 2  # the budget is counted on the sweep's own trials
    assert same.user_attrs[FACTS_ATTR]["dataset_sha256"] == reference.user_attrs[FACTS_ATTR]["dataset_sha256"]
    assert f"[baseline-same] warm start from {reference_sweep.run_dir}:baseline-{reg_name}: 3 trials carried" \
        in "\n".join(warm.console)
    space = load_search_space("baseline")
    trial_config = trial_param_space(load_sweep_config(warm.run_dir / "sweep.yaml"), space, "baseline",
                                     synthesize("regression", seed=0, sizes={"train": 8, "valid": 4, "test": 4}), "mae")
    defaults = space.default_point(resolve_config({**trial_config, "data": "unused", "out": "unused"}))
    assert all(t.params != defaults for t in own_trials(same))  # the warm start replaces the defaults-first trial

    fresh = new["baseline-fresh"]
    best = min((t for t in reference.trials if t.value is not None and not math.isnan(t.value)), key=lambda t: t.value)
    first = min(own_trials(fresh), key=lambda t: t.number)
    assert first.params == best.params and not [t for t in fresh.trials if CARRIED_ATTR in t.user_attrs]
    assert not any("first trial: the model's default config" in line for line in warm.console)

    own_ids = {t.user_attrs[TRIAL_TAG] for s in new.values() for t in own_trials(s)}
    assert {row.trials for row in warm.pairs} == {2}
    assert all(Path(row.best_checkpoint).name in own_ids for row in warm.pairs)
    assert sorted(c.trial_id for c in sweep_candidates(warm.run_dir)) == sorted(own_ids)
    # Its own registered names: the session server's other tests read msa-baseline-<reg_name>.
    (registered,) = [v for v in versions_of(mlflow_client, "msa-baseline-same") if v.tags[RUN_DIR_TAG] == str(warm.run_dir)]
    assert registered.tags[TRIAL_TAG] in {t.user_attrs[TRIAL_TAG] for t in own_trials(same)}
    (study_run,) = mlflow_client.search_runs(
        [mlflow_client.get_experiment_by_name(warm.run_dir.name).experiment_id],
        filter_string=f"tags.`{ROLE_TAG}` = 'study' and tags.`{PAIR_TAG}` = 'baseline-same'")
    assert study_run.data.tags["msa.warm_start.carried"] == "3"
    assert str(reference_sweep.run_dir) in study_run.data.tags["msa.warm_start.from"]


def test_a_dry_run_names_the_studies_a_warm_start_reads(tmp_path, capsys):
    folder = earlier_run_dir(tmp_path / "old", {"baseline-mosi": (TASK, TRIALS), "baseline-legacy": (None, TRIALS[:2])})
    config = sweep_yaml(tmp_path, search={"warm_start": [str(folder)]})
    assert main(["sweep", "--dry-run", str(config)]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert [line for line in plan if line.startswith("warm start")] == [
        f"warm start     {folder}:baseline-legacy: 2 scored trials of baseline (no task recorded: its best configs are queued)",
        f"warm start     {folder}:baseline-mosi: 4 scored trials of baseline",
    ]
