"""The tracking tests' one real sweep (4 trials, 2 at a time, ASHA), run once for the package on
the session's Ray, with its MLflow store served for reading."""
from __future__ import annotations

import pytest
import yaml

from msa.platform.sweep.config import load_sweep_config
from msa.platform.sweep.driver import run_sweep
from msa.platform.tracking.client import client
from msa.platform.tracking.server import MlflowServer


@pytest.fixture(scope="package")
def sweep(ray_runtime, tmp_path_factory):
    """The finished sweep's run directory and summary row, and its store served for reading."""
    tmp_path = tmp_path_factory.mktemp("tracked")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tracked", "storage": str(tmp_path / "sweeps"), "datasets": ["synth_regression"], "models": ["baseline"],
        "budget": {"trials_per_pair": 4, "max_epochs": 3},
        "search": {"seed": 0, "scheduler": "asha", "grace_period": 1, "reduction_factor": 2},
        "resources": {"workers_per_trial": 1, "max_concurrent_trials": 2}, "train": {"patience": 5},
    }))
    (row,) = run_sweep(load_sweep_config(path)).pairs
    (run_dir,) = (tmp_path / "sweeps").glob("tracked-*")
    with MlflowServer(run_dir) as server:
        yield {"run_dir": run_dir, "row": row, "uri": server.uri, "client": client(server.uri)}


