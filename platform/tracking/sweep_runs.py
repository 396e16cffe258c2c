"""The driver's side of a sweep's tracking: the experiment, the sweep run, one run per study,
and what happens when a study ends (plots, the study's outcome, registering its best trial).

Trial runs are opened by the trials themselves (`runs.py`); the driver closes them when Tune
ends a trial (`msa.platform.sweep.callbacks.TrialRunCloser`) and, at the end of a study, closes
any a killed driver left open. The server the URI points at is the caller's (the sweep's own,
started by the sweep session, or the configured one).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from msa.platform.core.run_dir import RunDir
from msa.platform.tracking.client import (
    PAIR_TAG,
    ROLE_TAG,
    RUN_DIR_TAG,
    STATE_TAG,
    TRIAL_TAG,
    client,
    environment_tags,
    experiment_id,
    find_or_create_run,
    find_runs,
    flatten,
    log_metrics,
    log_params,
)
from msa.platform.tracking.plots import optimization_history, param_importances
from msa.platform.tracking.registry import register_checkpoint, registered_name
from msa.platform.tracking.runs import TrialTracking, log_trial_outcome
from msa.platform.training.checkpoint import SeedGroup

STUDY_CLOSED_TAG = "msa.study_closed"  # "true" once `close_study` has run: a resumed sweep leaves it closed
STUDY_OUTCOMES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}


class SweepTracking:
    """The experiment (named after the run directory) and its sweep run. Use as a context
    manager: the sweep run and any study run left open end FINISHED, KILLED (a resumable stop:
    Ctrl-C, a full disk) or FAILED."""

    def __init__(self, uri: str, run_dir: RunDir, sweep_config: dict[str, Any]):
        self.uri, self.run_dir, self.sweep_config = uri, run_dir, sweep_config

    def __enter__(self) -> "SweepTracking":
        name = self.run_dir.name
        self.client = client(self.uri)
        self.experiment_id = experiment_id(self.client, name, tags={RUN_DIR_TAG: str(self.run_dir.root)})
        self.tags = {**environment_tags(), RUN_DIR_TAG: str(self.run_dir.root), "msa.sweep": name}
        self.sweep_run_id, created = find_or_create_run(
            self.client, self.experiment_id, {ROLE_TAG: "sweep"}, name=name, tags=self.tags)
        if created:
            log_params(self.client, self.sweep_run_id, flatten(self.sweep_config))
        print(f"MLflow: experiment {name!r} at {self.uri}", flush=True)
        return self

    def __exit__(self, kind, error, trace) -> None:
        """End the sweep run, and a study run left open by an interruption or error, alike."""
        status = "FINISHED" if kind is None else "KILLED" if issubclass(kind, KeyboardInterrupt) or \
            getattr(error, "resumable", False) else "FAILED"
        for study in find_runs(self.client, self.experiment_id, {ROLE_TAG: "study"}):
            if study.info.status == "RUNNING":
                self.client.set_terminated(study.info.run_id, status=status)
        self.client.set_terminated(self.sweep_run_id, status=status)

    def open_study(self, pair: str, model: str, dataset) -> tuple[TrialTracking, bool]:
        """The study's run (created, or found again on resume) and what its trials need, and
        whether an earlier driver of this sweep already closed it (`close_study`): then it stays
        closed."""
        study_tags = {RUN_DIR_TAG: str(self.run_dir.root), "msa.sweep": self.run_dir.name,
                      "msa.sweep_run_id": self.sweep_run_id, "model": model, "dataset": dataset.name,
                      "dataset_fingerprint": dataset.fingerprint, "metric_suite": dataset.metric_suite}
        match = {ROLE_TAG: "study", PAIR_TAG: pair}
        found = find_runs(self.client, self.experiment_id, {**match, STUDY_CLOSED_TAG: "true"}, max_results=1)
        if found:
            run_id, closed = found[0].info.run_id, True
        else:
            run_id, _ = find_or_create_run(self.client, self.experiment_id, match, name=pair,
                                           tags={**self.tags, **study_tags}, parent_run_id=self.sweep_run_id)
            closed = False
        return TrialTracking(uri=self.uri, experiment_id=self.experiment_id, study_run_id=run_id, pair=pair,
                             tags=study_tags, dataset_name=dataset.name,
                             dataset_source=str(Path(dataset.source).resolve()),
                             dataset_fingerprint=dataset.fingerprint), closed

    def tag_study(self, tracking: TrialTracking, tags: dict[str, str]) -> None:
        """Tags on the study's run (a warm start's sources)."""
        for key, value in tags.items():
            self.client.set_tag(tracking.study_run_id, key, value)

    def _close_left_open(self, pair: str, study) -> None:
        """Close the trial runs a killed driver left RUNNING: a trial that finished unknown to the
        restored Tune run is closed with its outcome; one the study handed to a new Ray trial,
        KILLED."""
        states = {t.user_attrs.get(TRIAL_TAG): STUDY_OUTCOMES.get(t.state) for t in study.get_trials(deepcopy=False)}
        for run in find_runs(self.client, self.experiment_id, {PAIR_TAG: pair, ROLE_TAG: "trial"}):
            if run.info.status != "RUNNING":
                continue
            state = run.data.tags.get(STATE_TAG) or states.get(run.data.tags[TRIAL_TAG])
            if state is None:
                self.client.set_terminated(run.info.run_id, status="KILLED")
            else:
                log_trial_outcome(self.client, run.info.run_id, self.run_dir.trial(pair, run.data.tags[TRIAL_TAG]), state)

    def close_study(self, tracking: TrialTracking, study, summary) -> None:
        """Log the study's outcome and plots, register its best trial, and close its run.

        `summary` is the pair's `msa.platform.sweep.summary.PairSummary`."""
        run_id = tracking.study_run_id
        self._close_left_open(tracking.pair, study)
        log_metrics(self.client, run_id, {"trials_complete": summary.complete, "trials_pruned": summary.pruned,
                                          "trials_failed": summary.failed,
                                          **({f"best_{summary.metric}": summary.best_value}
                                             if summary.best_value is not None else {})})
        self._log_plots(run_id, study, summary.complete + summary.pruned > 0)
        if summary.best_checkpoint is not None:
            self._register_best(tracking, Path(summary.best_checkpoint))
        self.client.set_tag(run_id, STUDY_CLOSED_TAG, "true")
        self.client.set_terminated(run_id, status="FINISHED")

    def _log_plots(self, run_id: str, study, any_finished: bool) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            if any_finished:
                self.client.log_artifact(run_id, str(optimization_history(study, Path(scratch) / "optimization_history.png")), "plots")
            try:
                self.client.log_artifact(run_id, str(param_importances(study, Path(scratch) / "param_importances.png")), "plots")
                self.client.set_tag(run_id, "param_importances", "plots/param_importances.png")
            except (ValueError, RuntimeError) as exc:  # fANOVA needs >= 2 complete trials with varied params
                self.client.set_tag(run_id, "param_importances", f"not computed: {exc}")

    def _register_best(self, tracking: TrialTracking, folder: Path) -> None:
        best_trial = folder.name
        (trial_run,) = find_runs(self.client, self.experiment_id, {TRIAL_TAG: best_trial, PAIR_TAG: tracking.pair})
        group = SeedGroup(folder)
        name = registered_name(tracking.tags["model"], tracking.tags["dataset"])
        version_tags = {
            "msa.run_id": trial_run.info.run_id, "msa.study_run_id": tracking.study_run_id,
            "msa.sweep_run_id": self.sweep_run_id, "msa.sweep": self.run_dir.name, RUN_DIR_TAG: str(self.run_dir.root),
            "msa.experiment_id": self.experiment_id, TRIAL_TAG: best_trial, "selection_metric": group.selection_metric,
            "dataset_fingerprint": tracking.dataset_fingerprint, "seeds": ",".join(map(str, group.seeds)),
            "weights_sha256": ",".join(c.metrics["weights_sha256"] for c in group.checkpoints),
            # a seed group's scores are its seed means, their spread beside them
            **{f"valid_{k}": str(v) for k, v in group.mean("valid").items()},
            **{f"test_{k}": str(v) for k, v in group.mean("test").items()},
            **({f"sd_valid_{k}": str(v) for k, v in group.sd("valid").items()} if len(group.seeds) > 1 else {}),
            **({f"sd_test_{k}": str(v) for k, v in group.sd("test").items()} if len(group.seeds) > 1 else {}),
        }
        registered = register_checkpoint(self.uri, trial_run.info.run_id, folder, name, version_tags)
        self.client.set_tag(tracking.study_run_id, "registered_model", f"{name}/{registered.version}")
        seeds = f" ({len(group.seeds)} seeds)" if len(group.seeds) > 1 else ""
        print(f"[{tracking.pair}] registered {name} version {registered.version} from trial {best_trial}{seeds}: "
              f"{registered.alias or 'no alias'}, {registered.reason}", flush=True)
