"""What several test files share (importable from tests, ``pythonpath`` in pyproject; no test file
imports another): the one builder of sweep configs, the `msa` console script run as a user runs
it, and readers of what a sweep leaves (its Optuna studies, its MLflow trial runs, its seed
groups' histories).

`sweep_yaml` starts from `DEFAULTS`, the smallest sweep (one baseline trial of 2 epochs on the
built-in synthetic regression set, one at a time, no early stopping); each section a test gives
is merged into its default, so a test names only what it is about.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

MSA = str(Path(sys.executable).parent / "msa")

DEFAULTS: dict[str, Any] = {
    "name": "t",
    "datasets": ["synth_regression"],
    "models": ["baseline"],
    "budget": {"trials_per_pair": 1, "max_epochs": 2},
    "search": {"scheduler": "none", "seed": 0},
    "resources": {"workers_per_trial": 1, "max_concurrent_trials": 1},
    "train": {"patience": 5},
}


def sweep_dict(folder: Path, **sections: Any) -> dict[str, Any]:
    """`DEFAULTS` with `sections` merged in (a mapping into its default mapping, anything else
    replacing it), stored under ``folder/sweeps`` unless ``storage`` is given."""
    config = {key: dict(value) if isinstance(value, dict) else value for key, value in DEFAULTS.items()}
    config["storage"] = str(folder / "sweeps")
    for key, value in sections.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and isinstance(config.get(key), dict) else value
    return config


def sweep_yaml(folder: Path, file: str = "sweep.yaml", **sections: Any) -> Path:
    """Write `sweep_dict(folder, **sections)` to ``folder/file``; returns its path."""
    path = folder / file
    path.write_text(yaml.safe_dump(sweep_dict(folder, **sections), sort_keys=False))  # a datasets: mapping keeps its order
    return path


def sweep_config(folder: Path, **sections: Any):
    """The validated `SweepConfig` of `sweep_yaml(folder, **sections)`."""
    from msa.platform.sweep.config import load_sweep_config

    return load_sweep_config(sweep_yaml(folder, **sections))


def synth_data(folder: Path, name: str, task: str = "regression", *, sizes: dict[str, int] | None = None,
               suffix: str = ".pkl") -> Path:
    """The built-in ``synth_<task>`` data (or `sizes` clips of it) written as ``folder/<name><suffix>``,
    named `name` inside too.

    A sweep names a pair and its registered model after the dataset (the name a file records,
    else its stem), so a sweep on this file owns its registered names even on a tracking server
    the whole session shares."""
    from msa.platform.data.readers import write_mmsa_pickle, write_npz
    from msa.platform.data.synth import synthesize

    path = folder / f"{name}{suffix}"
    dataset = synthesize(task, seed=0, sizes=sizes)
    dataset = dataclasses.replace(dataset, record=dataclasses.replace(dataset.record, name=name), validate=False)
    (write_npz if suffix == ".npz" else write_mmsa_pickle)(dataset, path)
    return path


def mmsa_named_alike(folder: Path) -> dict[str, Path]:
    """The built-in regression and classification sets as MMSA ships CMU-MOSI and CMU-MOSEI: two
    pickles named ``unaligned_50.pkl`` in two folders, with no name inside (a dataset then takes
    its file stem), by the built-in's name."""
    paths = {}
    for task in ("regression", "classification"):
        path = folder / task / "unaligned_50.pkl"
        path.parent.mkdir(parents=True)
        synth_data(path.parent, "unaligned_50", task)
        data = pickle.loads(path.read_bytes())
        del data["name"]
        path.write_bytes(pickle.dumps(data, protocol=4))
        paths[f"synth_{task}"] = path
    return paths


@dataclass(frozen=True)
class FinishedSweep:
    """A sweep a session fixture ran once for many tests to read."""

    run_dir: Path
    pairs: list  # each pair's PairSummary, in the sweep's order
    console: list[str]  # what it printed
    data: dict[str, Path]  # the data files it read, by dataset name

    def pair(self, name: str):
        return next(row for row in self.pairs if row.pair == name)


# Runs the command after it with SIGINT at its default, as a terminal's foreground command has
# it. A suite started as a background job of a non-interactive shell (`make test &`, CI runners)
# has SIGINT ignored, every child inherits that, and Python then installs no KeyboardInterrupt:
# the Ctrl-C tests' commands would never see their Ctrl-C.
WITH_CTRL_C = [sys.executable, "-c",
               "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"]


@dataclass(frozen=True)
class Driver:
    """The `msa` console script (or a Python snippet) in a process of its own, which starts its
    own Ray runtime and MLflow server as a user's command does. `env` is this process's
    environment without ``RAY_ADDRESS``."""

    env: dict[str, str]

    def run(self, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([MSA, *args], cwd=cwd, env=env or self.env, capture_output=True, text=True, timeout=timeout)

    def start(self, *args: str, cwd: Path, stdout=subprocess.PIPE, env: dict[str, str] | None = None) -> subprocess.Popen:
        """`msa ARGS` started in the background, its output (both streams) to `stdout`, with
        Ctrl-C (SIGINT) acting as it does on a terminal's command (`WITH_CTRL_C`)."""
        return subprocess.Popen([*WITH_CTRL_C, MSA, *args], cwd=cwd, env=env or self.env, stdout=stdout,
                                stderr=subprocess.STDOUT, text=True)

    def python(self, code: str, *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env or self.env, capture_output=True, text=True,
                              timeout=timeout)


def interrupt_until_it_returns(process: subprocess.Popen, every_s: float = 10.0, tries: int = 6) -> None:
    """Ctrl-C, again as a person would if the command goes on: a SIGINT that lands while Python
    forks a process (Ray's start forks several) is lost, since CPython ignores an exception raised
    in its at-fork handlers (docs/reliability.md, Limits)."""
    for _ in range(tries):
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=every_s)
            return
        except subprocess.TimeoutExpired:
            continue
    process.kill()
    raise AssertionError(f"the command did not stop after {tries} Ctrl-C")


def schema_written(db: Path) -> bool:
    """Whether Optuna has finished creating the database (read-only: opening one that the sweep
    is still creating with Optuna would race it to insert the schema version, once seen in CI)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as connection:
            return connection.execute("SELECT count(*) FROM alembic_version").fetchone()[0] > 0
    except sqlite3.Error:
        return False


def run_finished(config, data_files) -> FinishedSweep:
    """Run the sweep `config` with its console captured; `data_files(run_dir)` names the data
    files it read, by dataset."""
    from msa.platform.sweep.driver import run_sweep

    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        result = run_sweep(config)
    return FinishedSweep(result.run_dir.root, result.pairs, console.getvalue().splitlines(), data_files(result.run_dir))


def studies(run_dir: Path) -> dict[str, optuna.Study]:
    """The run's studies by pair; a database the sweep is still creating, or has created but not
    yet written its study into (a test polling a running sweep), is left out."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    found = {}
    for db in sorted((run_dir / "optuna").glob("*.db")):
        storage = f"sqlite:///{db}"
        if schema_written(db) and db.stem in optuna.get_all_study_names(storage):
            found[db.stem] = optuna.load_study(study_name=db.stem, storage=storage)
    return found


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def trial_runs(mlflow_client, run_dir: Path) -> list:
    """The MLflow trial runs of the sweep in `run_dir` (its experiment is named after the folder)."""
    experiment = mlflow_client.get_experiment_by_name(run_dir.name)
    return mlflow_client.search_runs([experiment.experiment_id], filter_string="tags.`msa.role` = 'trial'")


def store_client(run_dir: Path):
    """An MLflow client on a run directory's own store, read straight from its SQLite database:
    for a sweep whose driver (and so its server) is gone, without starting a server (7-11 s) to
    read what the server wrote. Artifacts are not reachable this way."""
    from mlflow.tracking import MlflowClient

    from msa.platform.core.run_dir import RunDir

    uri = f"sqlite:///{RunDir(run_dir).mlflow_db}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def versions_of(mlflow_client, name: str) -> list:
    """Every registered version of `name`."""
    return mlflow_client.search_model_versions(f"name = '{name}'")


def finished_mtimes(run_dir: Path) -> dict[str, list[float]]:
    """Each finished trial's Ray id (in every study) -> when its checkpoint's metrics.json was last
    written (a seed group's: each seed's)."""
    from msa.platform.core.run_dir import RunDir
    from msa.platform.training.checkpoint import SeedGroup

    return {t.user_attrs["ray_trial_id"]:
            [(checkpoint.folder / "metrics.json").stat().st_mtime
             for checkpoint in SeedGroup(RunDir(run_dir).trial(name, t.user_attrs["ray_trial_id"])).checkpoints]
            for name, study in studies(run_dir).items() for t in finished(study)}


def stop_when_finished(driver: subprocess.Popen, run_dirs, count: int, signum: int, *, until=None,
                       timeout: float = 420) -> Path:
    """Send `signum` to the sweep `driver` once its studies hold `count` finished trials (and
    `until(run_dir)` holds, when given); returns its run directory (the first of `run_dirs()`)."""
    deadline = time.time() + timeout
    while time.time() < deadline and driver.poll() is None:
        time.sleep(0.5)
        found = list(run_dirs())
        if found and (found[0] / "optuna").exists() and sum(len(finished(s)) for s in studies(found[0]).values()) >= count \
                and (until is None or until(found[0])):
            driver.send_signal(signum)
            return found[0]
    raise AssertionError(f"the sweep never reached {count} finished trials: {driver.communicate(timeout=60)[0][-3000:]}")


def reap_orphaned_ray_agents(timeout: float = 30) -> list[int]:
    """After a driver was SIGKILLed: kill the Ray agents its runtime left. Its node processes die
    with it, but the dashboard and runtime-env agents live on for a minute or more (on their way
    out they report the raylet's death to the GCS, which is gone too). An agent is orphaned when
    the raylet its environment names (``RAY_RAYLET_PID``) is no longer alive; only this test
    session's processes are looked at. Returns the pids killed."""
    import psutil

    mark = f"MSA_TEST_SESSION={os.environ.get('MSA_TEST_SESSION', '')}"
    deadline, killed = time.monotonic() + timeout, []
    while True:
        orphans = []
        for process in psutil.process_iter(["pid"]):
            try:
                environ = process.environ()
                if f"MSA_TEST_SESSION={environ.get('MSA_TEST_SESSION')}" != mark or "RAY_RAYLET_PID" not in environ:
                    continue
                raylet = int(environ["RAY_RAYLET_PID"])
                if raylet != process.pid and not (psutil.pid_exists(raylet) and "raylet" in " ".join(psutil.Process(raylet).cmdline())):
                    orphans.append(process)
            except (psutil.Error, ValueError):
                continue
        for process in orphans:
            with contextlib.suppress(psutil.Error):
                process.kill()
                killed.append(process.pid)
        if not orphans or time.monotonic() > deadline:
            return killed
        time.sleep(0.5)


def saved_checkpoints(run_dir: Path) -> dict[str, Path]:
    """Each unfinished Tune trial that has a checkpoint -> that checkpoint, as the sweep's saved
    Tune state names it (what `--resume` restores from); empty while the state is being written."""
    from ray.tune import ExperimentAnalysis
    from ray.tune.experiment import Trial

    from msa.platform.core.run_dir import RunDir

    try:
        trials = ExperimentAnalysis(str(RunDir(run_dir).tune_experiment)).trials
    except Exception:  # noqa: BLE001 - not written yet, or caught mid-write: the caller polls again
        return {}
    return {trial.trial_id: Path(trial.checkpoint.path) for trial in trials
            if trial.status not in (Trial.TERMINATED, Trial.ERROR) and trial.checkpoint is not None}


def seed_histories(folder: Path) -> dict[int, list[dict[str, str]]]:
    """Each seed's history.csv rows, of a seed group's folder."""
    from msa.platform.training.checkpoint import SeedGroup

    group = SeedGroup(folder)
    return {seed: checkpoint.history() for seed, checkpoint in zip(group.seeds, group.checkpoints)}


def processes_under(folder: Path, kind: str = "") -> list[str]:
    """Command lines of live processes that name a path under `folder` (and `kind`, when given:
    ``"mlflow"`` for a store's guard, server and uvicorn worker)."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(folder) in cmdline and kind in cmdline and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(cmdline)
    return found


def without_ray_address() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
