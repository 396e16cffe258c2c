"""The tracking tests read the session's reference sweep (tests/conftest.py) and the session's
MLflow server it logged to."""
from __future__ import annotations

import pytest

PAIR = "baseline-synth_regression"


@pytest.fixture(scope="package")
def sweep(reference_sweep, mlflow_client) -> dict:
    """The reference sweep's run directory, its baseline study on the synthetic regression set (the
    summary row), its data file, and the server: ``run_dir``, ``row``, ``data``, ``uri``, ``client``."""
    return {"run_dir": reference_sweep.run_dir, "row": reference_sweep.pair(PAIR), "uri": mlflow_client.tracking_uri,
            "client": mlflow_client, "data": reference_sweep.data["synth_regression"]}
