"""A full disk under a sweep: its run directory on a small tmpfs that the test fills while the
first trial trains, leaving less room than a checkpoint. The sweep must stop with its records
whole and the reason in Ray, Optuna and MLflow, and `--resume` must finish it once there is room;
and the driver's own look at a disk that stays full, and the reserve a sweep holds.

Mounting needs root (CI runs as root); elsewhere the test is skipped. The sweep runs its own
MLflow server, as a sweep without `tracking.uri` does, so that its store is on the full disk too."""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from helpers import store_client, sweep_config, synth_data, trial_runs
from optuna.trial import TrialState

from msa.platform.core.run_dir import RunDir
from msa.platform.core.errors import MsaError
from msa.platform.sweep.disk_full import FULL_FOR_S, RESERVE_BYTES, RESERVE_FILE, DiskFullStop, SpaceReserve, StorageFull
from msa.platform.sweep.driver import run_sweep
from msa.platform.training.checkpoint import SeedGroup

LEFT_FREE = 2_000_000  # bytes: room for the study's and MLflow's rows, not for a 3 MB best epoch or a 10 MB checkpoint
EPOCHS = 4


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)


def fill(disk: Path, ballast: Path, leave: int) -> None:
    with open(ballast, "ab") as out:
        out.write(bytes(max(0, shutil.disk_usage(disk).free - leave)))


def fill_after_first_checkpoint(disk: Path, ballast: Path) -> threading.Thread:
    """Fill `disk` up to `LEFT_FREE` bytes once the first trial's first resumable checkpoint is
    uploaded (half a second later: not while the next one uploads)."""
    def wait_and_fill() -> None:
        deadline = time.monotonic() + 300
        while not list(disk.glob("sweeps/*/ray/sweep/*/checkpoint_000000")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        fill(disk, ballast, LEFT_FREE)

    filler = threading.Thread(target=wait_and_fill, daemon=True)
    filler.start()
    return filler


def test_a_sweep_refuses_a_disk_without_room_for_its_reserve_and_the_driver_stops_on_a_disk_that_stays_full(
        small_disk, tmp_path):
    fill(small_disk, small_disk / "ballast", RESERVE_BYTES // 2)
    with pytest.raises(MsaError, match=r"has 8\.\d MiB free; a sweep holds 16 MiB there"):
        run_sweep(sweep_config(tmp_path, storage=str(small_disk / "sweeps")))  # refused before Ray or a server starts
    assert sorted(path.name for path in small_disk.iterdir()) == ["ballast"]  # no run directory, no storage folder

    (small_disk / "ballast").unlink()
    run_dir = RunDir(small_disk / "run")
    run_dir.root.mkdir()
    reserve = SpaceReserve(run_dir)
    reserve.hold()
    fill(small_disk, small_disk / "ballast", 0)  # no trial fails: nothing writes
    stop = DiskFullStop(run_dir, reserve, tracking_uri="")
    started = time.monotonic()
    while not stop.reason and time.monotonic() - started < 30:
        stop.on_step_end(0, [])
        time.sleep(0.2)
    assert stop.reason.startswith(f"the disk is full: 0 bytes free under {run_dir.root} for 5 s")
    assert time.monotonic() - started >= FULL_FOR_S and not reserve.path.exists()
    with pytest.raises(StorageFull, match=f"resume with: msa sweep --resume {run_dir.root}$"):
        stop.raise_if_stopped(run_dir)


def test_a_full_disk_stops_the_sweep_with_whole_records_and_resume_finishes_it(ray_runtime, small_disk, tmp_path):
    data = synth_data(tmp_path, "diskfull", sizes={"train": 1024, "valid": 64, "test": 64})  # epochs of a second or more
    space = tmp_path / "space.yaml"  # a wide model: its resumable checkpoint is about 10 MB
    space.write_text(yaml.safe_dump({"model_config.hidden": {"type": "fixed", "value": 512},
                                     "weight_decay": {"type": "float", "low": 0.0, "high": 1e-6}}))
    config = sweep_config(tmp_path, name="full", storage=str(small_disk / "sweeps"), datasets=[str(data)],
                          budget={"trials_per_pair": 2, "max_epochs": EPOCHS}, train={"patience": EPOCHS},
                          search={"sampler": "random", "spaces": {"baseline": str(space)}},
                          resources={"max_failures": 2})
    ballast = small_disk / "ballast"
    filler = fill_after_first_checkpoint(small_disk, ballast)
    with pytest.raises(StorageFull) as stopped:
        run_sweep(config)
    filler.join()
    (run_dir,) = (small_disk / "sweeps").iterdir()
    message = str(stopped.value)
    assert "\n" not in message and "No space left on device" in message
    assert message.endswith(f"msa sweep --resume {run_dir}")

    # the reason, alike in Ray, Optuna and MLflow; the trial is left to resume, not failed
    (study,) = [optuna.load_study(study_name=db.stem, storage=f"sqlite:///{db}") for db in RunDir(run_dir).study_dbs()]
    (stopped_trial,) = [t for t in study.trials if "stop_reason" in t.user_attrs]
    trial_id = stopped_trial.user_attrs["ray_trial_id"]
    assert stopped_trial.state == TrialState.RUNNING
    assert stopped_trial.user_attrs["stop_reason"].startswith(f"the disk is full: trial {trial_id} ")
    assert "No space left on device" in (RunDir(run_dir).tune_experiment / trial_id / "error.txt").read_text()
    (run,) = [r for r in trial_runs(store_client(run_dir), run_dir) if r.data.tags["ray_trial_id"] == trial_id]
    assert run.data.tags["msa.stop_reason"] == stopped_trial.user_attrs["stop_reason"]
    assert run.info.status == "RUNNING"  # open, as after Ctrl-C: the resumed trial logs on to it

    # nothing half-written: every resumable checkpoint loads whole, every published one verifies,
    # and the study claims no trial it cannot load
    saved = list(RunDir(run_dir).tune_experiment.glob("*/checkpoint_*"))
    assert saved and not list(run_dir.rglob("*.partial"))
    for checkpoint in saved:
        for weights in checkpoint.rglob("*.pt"):
            torch.load(weights, weights_only=True)
    for trial in study.trials:
        if trial.state == TrialState.COMPLETE:
            SeedGroup(RunDir(run_dir).trial(study.study_name, trial.user_attrs["ray_trial_id"])).first.verified_weights("test")
    assert not (run_dir / RESERVE_FILE).exists()  # given up to write the records, not held again until a resume

    ballast.unlink()
    (row,) = run_sweep(config, resume_dir=run_dir).pairs
    study = optuna.load_study(study_name=study.study_name, storage=RunDir(run_dir).study_url(study.study_name))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2 and row.complete == 2
    mlflow_client = store_client(run_dir)
    (run,) = [r for r in trial_runs(mlflow_client, run_dir) if r.data.tags["ray_trial_id"] == trial_id]
    assert run.info.status == "FINISHED"
    steps = [m.step for m in mlflow_client.get_metric_history(run.info.run_id, "train_loss")]
    assert sorted(steps) == list(range(1, len(steps) + 1)) and steps  # each epoch once, none lost
    assert not (run_dir / RESERVE_FILE).exists()
