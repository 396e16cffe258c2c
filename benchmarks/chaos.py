"""Chaos: a matrix sweep whose driver is killed and resumed, whose MLflow server is killed, and
whose trials fail on purpose; then an audit of what it recorded.

One sweep of two models (baseline, TFN) on three synthetic datasets, seed groups of 2 on every
pair (`budget.seeds_per_trial` is one value for the whole sweep, so not only on some pairs),
tiny trials (3 epochs), at least 100 of them. While it runs:

- its driver (`msa sweep CONFIG`, then `msa sweep --resume RUN_DIR`) is stopped `--kills` times,
  each a random moment (uniform within `--window` seconds, from 15 s after the driver opened its
  MLflow experiment, so trials are training) by SIGKILL (a crash) or SIGINT (Ctrl-C; a second
  one after 60 s if the first is not answered), both kinds in every schedule, and resumed each
  time. Before each resume, nothing the stopped driver started is left: its processes carry a
  marker in their environment; the Ray agents a SIGKILLed driver leaves (docs/reliability.md,
  Limits) are killed as the tests' `reap_orphaned_ray_agents` does, and anything else of it
  still alive after 2 minutes is killed and reported;
- the sweep's own MLflow server (the uvicorn process under the sweep's guard) is SIGKILLed at
  random moments (exponential gaps, mean `--server-gap` s) while it answers, at most twice per
  driver (its guard restarts it at most 3 times);
- each trial draws, as soak.py's space does, a fault (`inject_fault`: none, raise, kill) and a
  learning rate, of which 1e30 makes the loss NaN.

`--seed` seeds the kill schedule, the server kills and the sampler (hence each trial's draws).
Afterwards `msa ensemble RUN_DIR` builds the ensembles. The audit reads only the run's own
records: the Optuna studies, the checkpoints, the MLflow store (its SQLite database, read after
every process is gone), its registry and the leaderboard. It counts:

- lost: a study short of its budget, a trial not ended as its draw says (usable lr: COMPLETE;
  lr 1e30: FAIL for the NaN reason, alike in Optuna and MLflow), a trial without exactly one
  closed MLflow run, a missing epoch (MLflow or a seed's history.csv), a seed group that is not
  whole or whose weights do not verify (`Checkpoint.verified_weights`, every seed);
- run twice: a checkpoint file of a trial finished before a stop rewritten after it, a second
  closed (FINISHED/FAILED) MLflow run of one trial, a study holding more than its budget;
- logged twice: an MLflow metric point of a trial run logged twice (same key and step);
- registered twice: registry versions beyond one per study (and per dataset's ensemble);
- unclosed: a study without exactly one study run, FINISHED and tagged closed, or with a best
  trial but no registered version (or one not naming a finished trial of it, or other weights);
- bad members: an ensemble member that is not a COMPLETE or PRUNED trial with verified weights.

The MLflow rule: each Optuna trial has exactly one run tagged with its (final) Ray trial id,
closed FINISHED (COMPLETE or PRUNED) or FAILED (FAIL). Any other trial run must be KILLED, and is
allowed only as the first run of a trial a killed driver started but Tune's saved state did not
list (docs/reliability.md, Limits): same pair and same searched params as a trial of the study.
Such runs are counted (`adopted_runs`), not as errors; an unexplained one counts as lost.

    .venv/bin/python benchmarks/chaos.py --seed 0 --kills 5 [--out DIR]

Prints one JSON object; exits 1 when any count above is not 0 or fewer kills happened than asked.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import optuna
import psutil
import yaml
from optuna.trial import TrialState

sys.path.insert(0, str(Path(__file__).parent))
import soak  # noqa: E402  (its search space's fault draws and NaN learning rate)

MSA = str(Path(sys.executable).parent / "msa")
MARKER = "MSA_CHAOS_RUN"  # in the environment of every process a driver of this benchmark starts
MODELS = ("baseline", "tfn")
DATASETS = {"chaos_reg_a": ("regression", 1), "chaos_reg_b": ("regression", 2), "chaos_cls": ("classification", 3)}
SIZES = {"train": 96, "valid": 48, "test": 48}
SERVER_KILLS_PER_DRIVER = 2
SETTLE_S = 120.0
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


# ---------------------------------------------------------------- inputs


def write_inputs(folder: Path, args: argparse.Namespace) -> Path:
    """The synthetic datasets, the fault-drawing search spaces and the sweep config."""
    from msa.platform.data.readers import write_npz
    from msa.platform.data.synth import synthesize

    datasets = {}
    for name, (task, data_seed) in DATASETS.items():
        dataset = synthesize(task, seed=data_seed, sizes=SIZES)
        dataset = dataclasses.replace(dataset, record=dataclasses.replace(dataset.record, name=name), validate=False)
        write_npz(dataset, folder / f"{name}.npz")
        datasets[name] = str(folder / f"{name}.npz")
    space = folder / "chaos_space.yaml"
    space.write_text(yaml.safe_dump({
        "inject_fault": {"type": "categorical", "choices": ["none", "raise", "kill"]},
        "lr": {"type": "categorical", "choices": [1e-3, 3e-3, soak.NAN_LR]},
    }))
    config = folder / "chaos.yaml"
    config.write_text(yaml.safe_dump({
        "name": "chaos", "storage": str(folder / "sweeps"), "datasets": datasets, "models": list(MODELS),
        "train": {"patience": args.epochs, "inject_fault_epoch": 2},
        "budget": {"trials_per_pair": args.trials_per_pair, "seeds_per_trial": args.seeds, "max_epochs": args.epochs},
        "search": {"sampler": "random", "seed": args.seed, "scheduler": "none",
                   "spaces": {model: str(space) for model in MODELS}},
        "resources": {"workers_per_trial": 1, "max_concurrent_trials": 2, "max_failures": 1},
    }, sort_keys=False))
    return config


# ---------------------------------------------------------------- the run's processes


def marked(token: str) -> list[psutil.Process]:
    """Live processes started by this benchmark's drivers (their environment holds the marker)."""
    found = []
    for process in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(psutil.Error):
            if process.info["status"] != psutil.STATUS_ZOMBIE and process.environ().get(MARKER) == token:
                found.append(process)
    return found


def orphaned_agent(process: psutil.Process) -> bool:
    """A Ray process whose raylet (``RAY_RAYLET_PID``) is gone: the agents a SIGKILLed driver leaves."""
    raylet = int(process.environ()["RAY_RAYLET_PID"]) if "RAY_RAYLET_PID" in process.environ() else None
    if raylet is None or raylet == process.pid:
        return False
    with contextlib.suppress(psutil.Error):
        return "raylet" not in " ".join(psutil.Process(raylet).cmdline())
    return True


def settle(token: str) -> dict[str, list[str]]:
    """Wait until no process of a stopped driver is left: orphaned Ray agents are killed at once,
    anything else after `SETTLE_S`. Returns what was killed, by kind."""
    killed: dict[str, list[str]] = {"orphaned_agents": [], "lingering": []}
    deadline = time.monotonic() + SETTLE_S
    while True:
        left = marked(token)
        if not left:
            return killed
        for process in left:
            with contextlib.suppress(psutil.Error):
                kind = "orphaned_agents" if orphaned_agent(process) else "lingering" if time.monotonic() > deadline else ""
                if kind:
                    killed[kind].append(" ".join(process.cmdline()).strip()[:100])
                    process.kill()
        time.sleep(0.5)


def server_process(run_dir: Path, token: str) -> tuple[str, psutil.Process] | None:
    """The sweep's MLflow server: its guard's URI and the uvicorn process under the guard."""
    for process in marked(token):
        with contextlib.suppress(psutil.Error):
            cmdline = process.cmdline()
            if "msa.platform.tracking.guard" in cmdline and f"{run_dir}/mlflow/mlflow.db" in " ".join(cmdline):
                workers = [p for p in process.children(recursive=True) if "uvicorn" in " ".join(p.cmdline())]
                return (cmdline[cmdline.index("msa.platform.tracking.guard") + 2], workers[0]) if workers else None
    return None


def running_trials(run_dir: Path) -> dict[str, list[str]]:
    """Per pair with any, the study's RUNNING trials (number and Ray id), read-only from the
    SQLite files while the driver writes them."""
    running = {}
    for database in sorted((run_dir / "optuna").glob("*.db")):
        with contextlib.suppress(sqlite3.Error), contextlib.closing(
                sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)) as connection:
            rows = connection.execute(
                "SELECT t.number, t.state, a.value_json FROM trials t LEFT JOIN trial_user_attributes a "
                "ON a.trial_id = t.trial_id AND a.key = 'ray_trial_id'").fetchall()
            running[database.stem] = [f"#{number} {json.loads(ray_id) if ray_id else '?'}"
                                      for number, state, ray_id in rows if state == "RUNNING"]
    return {pair: trials for pair, trials in running.items() if trials}


# ---------------------------------------------------------------- the driver, stopped and resumed


@dataclasses.dataclass
class Chaos:
    """The schedule's state: its random streams, what happened, and the run's marker."""

    seed: int
    window: tuple[float, float]
    server_gap: float
    out: Path
    token: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    kills: list[dict] = dataclasses.field(default_factory=list)
    server_kills: list[dict] = dataclasses.field(default_factory=list)
    finished_files: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.server_rng = random.Random(f"server-{self.seed}")
        self.started = time.monotonic()

    def clock(self) -> float:
        return round(time.monotonic() - self.started, 1)

    def plan(self, count: int) -> list[tuple[str, float]]:
        """`count` stops: (signal, seconds after the driver's trials start), both signals present."""
        rng = random.Random(self.seed)
        kinds = (["SIGKILL", "SIGINT"] * count)[:count]
        rng.shuffle(kinds)
        return [(kind, round(rng.uniform(*self.window), 1)) for kind in kinds]

    def drive(self, config: Path, count: int) -> tuple[Path | None, int]:
        """The first driver, then one resume per stop and a last one left to finish; returns
        the run directory and the status of the driver that ended on its own."""
        run_dir = None
        for life, stop in enumerate([*self.plan(count), None]):
            args = ["sweep", "--resume", str(run_dir)] if run_dir else ["sweep", str(config)]
            log = self.out / f"driver-{life}.log"
            with log.open("w") as handle:
                driver = subprocess.Popen([MSA, *args], stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                          env={**os.environ, MARKER: self.token}, preexec_fn=_ctrl_c_as_on_a_terminal)
            trials_from = self.wait_for_trials(driver, log)
            run_dir = run_dir or next((self.out / "sweeps").glob("chaos-*"), None)
            if run_dir is None or trials_from is None or not self.live(driver, run_dir, life, trials_from, stop):
                driver.wait()
                settle(self.token)
                return run_dir, driver.returncode
        raise AssertionError("the last driver has no stop")

    def wait_for_trials(self, driver: subprocess.Popen, log: Path) -> float | None:
        """When the driver opened its MLflow experiment (its trials are queued next); None if it exited first."""
        while driver.poll() is None:
            if "MLflow: experiment" in log.read_text(errors="replace"):
                return time.monotonic()
            time.sleep(0.2)
        return None

    def live(self, driver: subprocess.Popen, run_dir: Path, life: int, trials_from: float,
             stop: tuple[str, float] | None) -> bool:
        """Let the driver run, killing its server now and then, until its stop is due (then stop
        it and return True) or it exits on its own (False)."""
        stop_at = trials_from + 15 + stop[1] if stop else math.inf
        next_server_kill = time.monotonic() + self.server_rng.expovariate(1 / self.server_gap)
        server_kills = 0
        while driver.poll() is None:
            now = time.monotonic()
            if now >= stop_at:
                self.stop(driver, run_dir, life, stop[0], now - trials_from)
                return True
            if now >= next_server_kill:
                if server_kills < SERVER_KILLS_PER_DRIVER:
                    server_kills += self.kill_server(run_dir, life)
                next_server_kill = now + self.server_rng.expovariate(1 / self.server_gap)
            time.sleep(0.2)
        return False

    def kill_server(self, run_dir: Path, life: int) -> bool:
        """SIGKILL the sweep's MLflow server if it answers (a restarting one is left alone)."""
        from msa.platform.tracking.server import healthy

        found = server_process(run_dir, self.token)
        if found is None or not healthy(found[0], timeout=1.0):
            self.server_kills.append({"at_s": self.clock(), "driver": life, "skipped": "server not answering"})
            return False
        with contextlib.suppress(psutil.Error):
            found[1].kill()
        self.server_kills.append({"at_s": self.clock(), "driver": life, "pid": found[1].pid,
                                  "running": running_trials(run_dir)})
        return True

    def stop(self, driver: subprocess.Popen, run_dir: Path, life: int, kind: str, after: float) -> None:
        """Stop the driver as a crash (SIGKILL) or Ctrl-C (SIGINT) would; wait until nothing of it is left."""
        record = {"at_s": self.clock(), "driver": life, "signal": kind, "after_trials_start_s": round(after, 1),
                  "running": running_trials(run_dir)}
        stopped = time.monotonic()
        if kind == "SIGKILL":
            driver.kill()
            driver.wait()
        else:
            record["sigints"] = interrupt(driver)
        record["exit"] = driver.returncode
        record["stop_s"] = round(time.monotonic() - stopped, 1)
        record.update(settle(self.token))
        self.snapshot(run_dir)
        record["finished_after"] = len(self.finished_files)
        self.kills.append(record)
        print(f"[chaos] {json.dumps(record)}", file=sys.stderr, flush=True)

    def snapshot(self, run_dir: Path) -> None:
        """Each finished trial's checkpoint files and their mtimes (first seen only): none may change later."""
        for key, files in finished_checkpoint_files(run_dir).items():
            self.finished_files.setdefault(key, files)


def _ctrl_c_as_on_a_terminal() -> None:
    """SIGINT at its default in the driver, as a terminal's command has it (a background job of a
    non-interactive shell inherits it ignored, and Python would then install no KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt(driver: subprocess.Popen, wait_s: float = 60.0) -> int:
    """Ctrl-C, again if it goes on after `wait_s` (one landing while Python forks is lost); a
    SIGKILL if still running after a second wait. Returns how many SIGINTs were sent."""
    for sent in (1, 2):
        driver.send_signal(signal.SIGINT)
        try:
            driver.wait(timeout=wait_s)
            return sent
        except subprocess.TimeoutExpired:
            continue
    driver.kill()
    driver.wait()
    return 2


# ---------------------------------------------------------------- reading the run


def studies(run_dir: Path) -> dict[str, optuna.Study]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    found = {}
    for database in sorted((run_dir / "optuna").glob("*.db")):
        storage = f"sqlite:///{database}"
        if database.stem in optuna.get_all_study_names(storage):
            found[database.stem] = optuna.load_study(study_name=database.stem, storage=storage)
    return found


def finished_checkpoint_files(run_dir: Path) -> dict[str, dict[str, int]]:
    """``pair/ray id`` of each finished trial -> mtime (ns) of each file of its checkpoint folder."""
    from msa.platform.core.run_dir import RunDir

    out = {}
    for pair, study in studies(run_dir).items():
        for trial in study.get_trials(deepcopy=False, states=FINISHED):
            folder = RunDir(run_dir).trial(pair, trial.user_attrs.get("ray_trial_id", ""))
            out[f"{pair}/{folder.name}"] = {str(p.relative_to(folder)): p.stat().st_mtime_ns
                                            for p in sorted(folder.rglob("*")) if p.is_file()}
    return out


def metric_points(run_dir: Path) -> dict[str, dict[str, Counter]]:
    """run id -> metric key -> Counter of steps (points logged per step), straight from the store."""
    from msa.platform.core.run_dir import RunDir

    points: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    with contextlib.closing(sqlite3.connect(f"file:{RunDir(run_dir).mlflow_db}?mode=ro", uri=True)) as connection:
        for run_id, key, step, count in connection.execute(
                "SELECT run_uuid, key, step, COUNT(*) FROM metrics GROUP BY run_uuid, key, step"):
            points[run_id][key][step] = count
    return points


def all_runs(mlflow_client, experiment_id: str, role: str) -> list:
    runs, token = [], None
    while True:
        page = mlflow_client.search_runs([experiment_id], filter_string=f"tags.`msa.role` = '{role}'",
                                         max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def same_params(run, trial) -> bool:
    """Whether an MLflow run was made with the trial's searched params."""
    for name, value in trial.params.items():
        logged = run.data.params.get(name)
        try:
            if logged is None or not math.isclose(float(logged), float(value)):
                return False
        except ValueError:
            if logged != str(value):
                return False
    return True


# ---------------------------------------------------------------- the audit


class Audit:
    """The counts and the detail behind each."""

    COUNTS = ("lost", "run_twice", "logged_twice", "registered_twice", "unclosed", "bad_members")

    def __init__(self) -> None:
        self.detail: dict[str, list[str]] = {name: [] for name in self.COUNTS}
        self.tally: Counter = Counter()

    def add(self, count: str, what: str) -> None:
        self.detail[count].append(what)

    def counts(self) -> dict[str, int]:
        return {name: len(self.detail[name]) for name in self.COUNTS}


def audit_run(run_dir: Path, args: argparse.Namespace, finished_before: dict[str, dict[str, int]], audit: Audit) -> None:
    from mlflow.tracking import MlflowClient

    from msa.platform.core.run_dir import RunDir

    uri = f"sqlite:///{RunDir(run_dir).mlflow_db}"
    mlflow_client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment_id = mlflow_client.get_experiment_by_name(run_dir.name).experiment_id
    runs = all_runs(mlflow_client, experiment_id, "trial")
    points = metric_points(run_dir)
    by_trial = defaultdict(list)
    for run in runs:
        by_trial[run.data.tags.get("msa.pair"), run.data.tags.get("ray_trial_id")].append(run)
    found = studies(run_dir)
    pairs = [f"{model}-{dataset}" for model in MODELS for dataset in DATASETS]
    owned = set()
    for pair in pairs:
        study = found.get(pair)
        trials = study.trials if study else []
        if len(trials) < args.trials_per_pair:
            audit.add("lost", f"{pair}: study holds {len(trials)} of {args.trials_per_pair} trials")
        if len(trials) > args.trials_per_pair:
            audit.add("run_twice", f"{pair}: study holds {len(trials)} trials, budget {args.trials_per_pair}")
        for trial in trials:
            ray_id = trial.user_attrs.get("ray_trial_id", "")
            owned.add((pair, ray_id))
            audit_trial(run_dir, pair, trial, by_trial[pair, ray_id], points, args, audit)
        audit_study(mlflow_client, experiment_id, run_dir, pair, trials, audit)
    for (pair, ray_id), extra in by_trial.items():
        if (pair, ray_id) in owned:
            continue
        for run in extra:
            audit_extra_run(run, found.get(pair), audit)
    for run in runs:  # every trial run, adopted ones too: no point twice
        for key, steps in points[run.info.run_id].items():
            for step, count in steps.items():
                if count > 1:
                    audit.add("logged_twice", f"run {run.info.run_id} ({run.data.tags.get('ray_trial_id')}): {key} "
                                              f"step {step} logged {count} times")
    now = finished_checkpoint_files(run_dir)
    for key, files in finished_before.items():
        if now.get(key) != files:
            changed = sorted(f for f in set(files) | set(now.get(key, {})) if files.get(f) != now.get(key, {}).get(f))
            audit.add("run_twice", f"{key}: finished before a stop, its checkpoint changed since: {changed}")
    audit.tally["trials_in_studies"] = sum(len(study.trials) for study in found.values())
    audit.tally["trial_runs"] = len(runs)


def audit_trial(run_dir: Path, pair: str, trial, runs: list, points: dict, args: argparse.Namespace, audit: Audit) -> None:
    """One Optuna trial against its draw, its MLflow runs, its epochs and its checkpoint."""
    from msa.platform.core.run_dir import RunDir

    ray_id = trial.user_attrs.get("ray_trial_id", "")
    fault, nan = trial.params.get("inject_fault"), trial.params.get("lr") == soak.NAN_LR
    audit.tally[f"drawn {fault}{' + NaN lr' if nan else ''}"] += 1
    audit.tally[trial.state.name.lower()] += 1
    name = f"{pair} #{trial.number} ({ray_id}, fault {fault}, lr {trial.params.get('lr')})"
    closed = [r for r in runs if r.info.status in ("FINISHED", "FAILED")]
    for run in runs:
        if run.info.status not in ("FINISHED", "FAILED", "KILLED"):
            audit.add("lost", f"{name}: MLflow run {run.info.run_id} left {run.info.status}")
        elif run.info.status == "KILLED":
            audit.tally["killed_runs_of_own_id"] += 1
    if len(closed) > 1:
        audit.add("run_twice", f"{name}: {len(closed)} closed MLflow runs")
    if not closed:
        audit.add("lost", f"{name}: no closed MLflow run ({[r.info.status for r in runs]})")
        return
    run = closed[0]
    if nan:
        reason = trial.user_attrs.get("fail_reason", "")
        if trial.state != TrialState.FAIL or "training loss became nan" not in reason:
            audit.add("lost", f"{name}: NaN learning rate but {trial.state.name} ({reason})")
        elif run.info.status != "FAILED" or run.data.tags.get("msa.fail_reason") != reason:
            audit.add("lost", f"{name}: MLflow does not record the failure (run {run.info.status})")
        audit_epochs(name, run, points, None, audit)
        return
    if trial.state != TrialState.COMPLETE:
        audit.add("lost", f"{name}: ended {trial.state.name} ({trial.user_attrs.get('fail_reason', '')})")
        return
    if run.info.status != "FINISHED" or run.data.tags.get("msa.trial_state") != "complete":
        audit.add("lost", f"{name}: MLflow run {run.info.status}, state tag {run.data.tags.get('msa.trial_state')}")
    audit_epochs(name, run, points, args.epochs, audit)
    audit_checkpoint(name, RunDir(run_dir).trial(pair, ray_id), args, audit)


def audit_epochs(name: str, run, points: dict, epochs: int | None, audit: Audit) -> None:
    """Every per-epoch metric at steps 1..`epochs` (a failed trial's: 1..k, any k), every
    metric of the close once (step 0)."""
    series = points[run.info.run_id]
    per_epoch = {key: steps for key, steps in series.items() if max(steps) > 0}
    if epochs is not None and "train_loss" not in per_epoch:
        audit.add("lost", f"{name}: no epoch in MLflow")
    for key, steps in per_epoch.items():
        expected = list(range(1, (epochs or max(steps)) + 1))
        if sorted(steps) != expected:
            audit.add("lost", f"{name}: MLflow {key} has epochs {sorted(steps)}")


def audit_checkpoint(name: str, folder: Path, args: argparse.Namespace, audit: Audit) -> None:
    """The whole seed group, every seed's weights verified and each epoch in its history once."""
    from msa.platform.training.checkpoint import SeedGroup

    group = SeedGroup(folder)
    try:
        if not group.exists() or group.seeds != list(range(args.seed, args.seed + args.seeds)):
            audit.add("lost", f"{name}: seed group not whole: {folder}")
            return
        for checkpoint in group.checkpoints:
            checkpoint.verified_weights(name)
            epochs = [int(row["epoch"]) for row in checkpoint.history()]
            if epochs != list(range(1, args.epochs + 1)):
                audit.add("lost", f"{name}: seed {checkpoint.metrics['seed']} history epochs {epochs}")
    except Exception as error:  # noqa: BLE001 - any failure to read or verify is a loss
        audit.add("lost", f"{name}: {error}")


def audit_extra_run(run, study, audit: Audit) -> None:
    """A trial run no Optuna trial names: only the KILLED first run of an adopted trial is allowed."""
    tags = run.data.tags
    name = f"run {run.info.run_id} ({tags.get('msa.pair')}/{tags.get('ray_trial_id')}, {run.info.status})"
    if run.info.status in ("FINISHED", "FAILED"):
        audit.add("run_twice", f"{name}: closed, but no trial of the study has its Ray id")
    elif run.info.status != "KILLED":
        audit.add("lost", f"{name}: left open, no trial of the study has its Ray id")
    elif study is None or not any(same_params(run, trial) for trial in study.trials):
        audit.add("lost", f"{name}: KILLED, but its params are no trial's of its study")
    else:
        audit.tally["adopted_runs"] += 1


def audit_study(mlflow_client, experiment_id: str, run_dir: Path, pair: str, trials: list, audit: Audit) -> None:
    """One study run, FINISHED and tagged closed; one registered version, of a finished trial, same weights."""
    from msa.platform.core.run_dir import RunDir
    from msa.platform.tracking.registry import registered_name
    from msa.platform.training.checkpoint import SeedGroup

    study_runs = [r for r in all_runs(mlflow_client, experiment_id, "study") if r.data.tags.get("msa.pair") == pair]
    if [(r.info.status, r.data.tags.get("msa.study_closed")) for r in study_runs] != [("FINISHED", "true")]:
        audit.add("unclosed", f"{pair}: study runs {[(r.info.status, r.data.tags.get('msa.study_closed')) for r in study_runs]}")
    model, dataset = pair.split("-", 1)
    versions = mlflow_client.search_model_versions(f"name = '{registered_name(model, dataset)}'")
    if len(versions) > 1:
        audit.add("registered_twice", f"{pair}: {len(versions)} versions "
                                      f"({[(v.version, v.tags.get('ray_trial_id')) for v in versions]})")
    finished = {t.user_attrs.get("ray_trial_id") for t in trials if t.state in FINISHED}
    if finished and not versions:
        audit.add("unclosed", f"{pair}: finished trials but no registered version")
    for version in versions:
        trial_id = version.tags.get("ray_trial_id")
        if version.tags.get("msa.sweep") != run_dir.name or trial_id not in finished:
            audit.add("unclosed", f"{pair}: version {version.version} names trial {trial_id}, not a finished one")
            continue
        weights = ",".join(c.metrics["weights_sha256"] for c in SeedGroup(RunDir(run_dir).trial(pair, trial_id)).checkpoints)
        if version.tags.get("weights_sha256") != weights:
            audit.add("unclosed", f"{pair}: version {version.version} records other weights than trial {trial_id}'s")


def ensemble_and_audit(run_dir: Path, token: str, audit: Audit) -> dict:
    """`msa ensemble RUN_DIR` (top 3 per model and dataset, fewer if a pair finished fewer), then: every member a finished trial with verified weights; each
    dataset's ensemble registered once."""
    from mlflow.tracking import MlflowClient

    from msa.platform.core.run_dir import RunDir
    from msa.platform.training.checkpoint import SeedGroup

    finished = {f"{pair.split('-', 1)[0]}/{t.user_attrs.get('ray_trial_id')}": RunDir(run_dir).trial(pair, t.user_attrs["ray_trial_id"])
                for pair, study in studies(run_dir).items() for t in study.trials if t.state in FINISHED}
    top_k = min(3, *(sum(t.state in FINISHED for t in study.trials) for study in studies(run_dir).values()))
    if top_k < 1:
        audit.add("lost", "a pair has no finished trial: no ensemble built")
        return {"exit": None}
    started = time.monotonic()
    done = subprocess.run([MSA, "ensemble", str(run_dir), "--top-k", str(top_k), "--folds", "3", "--seeds", "2",
                           "--bootstrap", "100"], capture_output=True, text=True, env={**os.environ, MARKER: token})
    settle(token)
    if done.returncode != 0:
        audit.add("bad_members", f"msa ensemble exited {done.returncode}: {done.stderr.strip()[-500:]}")
        return {"exit": done.returncode}
    board = json.loads((RunDir(run_dir).ensembles_dir / "leaderboard.json").read_text())
    members = set()
    for entry in board["datasets"]:
        for row in entry["rows"]:
            for member in row["members"]:
                name = member["name"]
                if row["kind"] == "seed ensemble":  # the best single's own seeds (<trial>-seed-<k>), then retrained ones
                    if "-seed-" not in name:
                        continue
                    name = name.rsplit("-seed-", 1)[0]
                members.add(name)
                if name not in finished:
                    audit.add("bad_members", f"{entry['dataset']}: {row['name']} has member {member['name']}, "
                                             f"not a COMPLETE or PRUNED trial")
    for name in sorted(members & set(finished)):
        try:
            for checkpoint in SeedGroup(finished[name]).checkpoints:
                checkpoint.verified_weights(name)
        except Exception as error:  # noqa: BLE001 - any failure to verify
            audit.add("bad_members", f"{name}: {error}")
    uri = f"sqlite:///{RunDir(run_dir).mlflow_db}"
    mlflow_client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for entry in board["datasets"]:
        versions = mlflow_client.search_model_versions(f"name = 'msa-ensemble-{entry['dataset']}'")
        if len(versions) > 1:
            audit.add("registered_twice", f"msa-ensemble-{entry['dataset']}: {len(versions)} versions")
    return {"exit": 0, "top_k": top_k, "wall_s": round(time.monotonic() - started, 1), "members": len(members)}


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kills", type=int, default=5, help="driver stops (SIGKILL and SIGINT mixed)")
    parser.add_argument("--trials-per-pair", type=int, default=17, help="x 6 pairs (default: 102 trials)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per trial (seed groups on every pair)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--window", type=float, nargs=2, default=(10.0, 120.0), metavar=("LOW", "HIGH"),
                        help="a stop comes uniformly in this many seconds after 15 s of a driver's trials")
    parser.add_argument("--server-gap", type=float, default=90.0, help="mean seconds between MLflow server kills")
    parser.add_argument("--out", type=Path, default=None, help="folder for the run (default: a temporary one)")
    args = parser.parse_args()

    out = (args.out or Path(tempfile.mkdtemp(prefix="msa-chaos-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = write_inputs(out, args)
    chaos = Chaos(seed=args.seed, window=tuple(args.window), server_gap=args.server_gap, out=out)
    run_dir, status = chaos.drive(config, args.kills)
    sweep_wall = chaos.clock()
    audit = Audit()
    report = {"machine": f"{platform.node()} {platform.processor() or platform.machine()} {os.cpu_count()} cores",
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv),
              "seed": args.seed, "run_dir": str(run_dir), "last_driver_exit": status}
    if run_dir is None or status != 0:
        audit.add("lost", f"the sweep did not finish (last driver exit {status}); see {out}/driver-*.log")
    else:
        audit_run(run_dir, args, chaos.finished_files, audit)
        report["ensemble"] = ensemble_and_audit(run_dir, chaos.token, audit)
    counts = audit.counts()
    guard_restarts = (run_dir / "mlflow" / "server.log").read_text(errors="replace").count("starting it again") \
        if run_dir else 0
    report.update({
        "wall_s": chaos.clock(), "sweep_wall_s": sweep_wall,
        "trials": len(MODELS) * len(DATASETS) * args.trials_per_pair, "seeds_per_trial": args.seeds,
        "epochs": args.epochs, "kills_asked": args.kills, "kills_done": len(chaos.kills),
        "kills": chaos.kills,
        "server_kills_done": sum("pid" in kill for kill in chaos.server_kills), "guard_restarts": guard_restarts,
        "server_kills": chaos.server_kills,
        "tally": dict(sorted(audit.tally.items())), **counts,
        "detail": {name: lines for name, lines in audit.detail.items() if lines},
    })
    print(json.dumps(report, indent=2))
    return int(any(counts.values()) or len(chaos.kills) < args.kills)


if __name__ == "__main__":
    sys.exit(main())
