"""A full disk under a sweep's run directory: the sweep stops, as after Ctrl-C, with its records
whole, and `msa sweep --resume` finishes it once there is space.

Retrying a trial on a full disk fails again, and every other trial fails the same way at its next
checkpoint, so the first trial that fails with ``ENOSPC`` stops the sweep (`DiskFullStop`, a Tune
callback in the driver), and so does a disk the driver finds with under 1 MiB free for 5 s (the
first write to fail may be the MLflow server's, which makes no trial fail: its clients retry). By then the disk has no room to record anything: the run directory
holds a reserve file (`SpaceReserve`, made when a sweep starts or resumes) that is deleted first,
so that the study, the MLflow store (the sweep's own server keeps it in the run directory) and
Tune's saved state can still be written. The failed trial's half-uploaded checkpoint is deleted;
Tune's state still names the last complete one, which the resumed trial continues from.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import time

import optuna
from optuna.trial import TrialState
from ray import tune
from ray.tune.experiment import Trial

from msa.platform.core.compat import unregistered_checkpoints
from msa.platform.core.errors import MsaError
from msa.platform.core.run_dir import RunDir
from msa.platform.sweep.schedule import PAIR_KEY
from msa.platform.tracking.client import TRIAL_TAG, client, find_runs
from msa.platform.tracking.runs import failure_reason

RESERVE_FILE = ".space-reserve"
RESERVE_BYTES = 16 * 2**20
FULL_BELOW, FULL_FOR_S, LOOK_EVERY_S = 2**20, 5.0, 1.0  # the driver's own look at the free space
STOP_REASON = "stop_reason"  # Optuna user attr; MLflow tag msa.stop_reason
FULL_MARKS = ("No space left on device", f"[Errno {errno.ENOSPC}]", f"[errno {errno.ENOSPC}]")


def says_disk_full(reason: str) -> bool:
    return any(mark in reason for mark in FULL_MARKS)


class SpaceReserve:
    """`RESERVE_BYTES` of the run directory's disk held in a file while the sweep runs."""

    def __init__(self, run_dir: RunDir):
        self.path = run_dir.root / RESERVE_FILE

    def hold(self) -> None:
        """Raises:
            MsaError: the disk has less room than the reserve (nothing is left behind)."""
        try:
            with open(self.path, "wb") as reserve:
                reserve.write(bytes(RESERVE_BYTES))
                reserve.flush()
                os.fsync(reserve.fileno())
        except OSError as exc:
            self.release()
            if exc.errno != errno.ENOSPC:
                raise
            free = shutil.disk_usage(self.path.parent).free
            raise MsaError(f"the disk of {self.path.parent} has {free / 2**20:.1f} MiB free; a sweep holds "
                           f"{RESERVE_BYTES // 2**20} MiB there to record a full disk: free space and run again") from None

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


class StorageFull(MsaError):
    """The run directory's disk filled up; the sweep stopped with its state saved."""

    exit_code = 1
    resumable = True


class DiskFullStop(tune.Callback):
    """Stops the sweep at the first trial that failed for a full disk, or when the disk stays full:
    frees the reserve, deletes the failed trial's half-written checkpoint, records why in the
    Optuna trial (user attr ``stop_reason``) and MLflow run (tag ``msa.stop_reason``) of that
    trial (of every running one, when the driver saw the disk full), and ends Tune's run as
    Ctrl-C does (SIGUSR1, which Tune handles alike), so every trial keeps its last complete
    checkpoint."""

    def __init__(self, run_dir: RunDir, reserve: SpaceReserve, tracking_uri: str):
        self.run_dir, self.reserve, self.tracking_uri = run_dir, reserve, tracking_uri
        self.reason = ""
        self.last_look, self.full_since = 0.0, None

    def __getstate__(self) -> dict:
        return {"run_dir": self.run_dir}

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._check(trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._check(trial)

    def on_step_end(self, iteration, trials, **info) -> None:
        # A full disk can first break a write that makes no trial fail: the MLflow server's
        # store, whose clients retry for minutes. The driver looks at the free space itself.
        now = time.monotonic()
        if self.reason or now - self.last_look < LOOK_EVERY_S:
            return
        self.last_look = now
        free = shutil.disk_usage(self.run_dir.root).free
        self.full_since = None if free >= FULL_BELOW else self.full_since or now
        if self.full_since is not None and now - self.full_since >= FULL_FOR_S:
            self._stop(f"the disk is full: {free} bytes free under {self.run_dir.root} for {FULL_FOR_S:.0f} s",
                       [trial for trial in trials if trial.status == Trial.RUNNING])

    def _check(self, trial) -> None:
        reason = failure_reason(trial.error_file)
        if self.reason or not says_disk_full(reason):
            return
        self.reserve.release()
        for partial in unregistered_checkpoints(trial):
            shutil.rmtree(partial, ignore_errors=True)
        self._stop(f"the disk is full: trial {trial.trial_id} of {trial.config[PAIR_KEY]} failed: {reason}", [trial])

    def _stop(self, reason: str, trials: list) -> None:
        """Give up the reserve, record `reason` on `trials`, and end Tune's run."""
        self.reserve.release()
        self.reason = reason
        for trial in trials:
            pair = trial.config[PAIR_KEY]
            storage = optuna.storages.RDBStorage(self.run_dir.study_url(pair))
            study_id = storage.get_study_id_from_name(pair)
            for frozen in storage.get_all_trials(study_id, deepcopy=False):
                if frozen.user_attrs.get(TRIAL_TAG) == trial.trial_id and frozen.state == TrialState.RUNNING:
                    storage.set_trial_user_attr(storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number),
                                                STOP_REASON, reason)
            mlflow_client = client(self.tracking_uri)
            experiment = mlflow_client.get_experiment_by_name(self.run_dir.name)
            for run in find_runs(mlflow_client, experiment.experiment_id, {TRIAL_TAG: trial.trial_id}):
                mlflow_client.set_tag(run.info.run_id, f"msa.{STOP_REASON}", reason)
        print(f"msa: {reason}; stopping the sweep", flush=True)
        if callable(signal.getsignal(signal.SIGUSR1)):  # Tune's handler: only in the main thread
            os.kill(os.getpid(), signal.SIGUSR1)

    def raise_if_stopped(self, run_dir: RunDir) -> None:
        if self.reason:
            raise StorageFull(f"{self.reason}; free space on the disk of {run_dir.root}, then resume with: "
                              f"msa sweep --resume {run_dir.root}")
