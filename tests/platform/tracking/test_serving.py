"""A registered model without msa-sweep, on the session's reference sweep (conftest.py): what it
carries (its serving code only, exact requirements), loading it in a process where ``import
msa`` fails, and ``mlflow models serve --env-manager local`` answering ``/invocations`` with
exactly `msa predict`'s predictions, also to requests sent at once. Seed groups, ensembles and raw-text encoder models are
served in the tests that register them (test_seed_groups, test_build, test_text_encoder_sweep)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import mlflow.artifacts
import numpy as np
from clean_env import check_serves_like_msa_predict, invocations_body, invoke, msa_predictions, served, serving_inputs

from msa.platform.tracking.code_paths import serving_closure
from msa.platform.tracking.registry import load_registered

MODEL_NAME = "msa-baseline-synth_regression"
MODEL_URI = f"models:/{MODEL_NAME}@champion"


def test_a_registered_model_carries_its_serving_path_and_exact_requirements(sweep, tmp_path):
    mlflow.set_tracking_uri(sweep["uri"])
    mlflow.set_registry_uri(sweep["uri"])
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=MODEL_URI, dst_path=str(tmp_path)))
    carried = sorted(str(path.relative_to(folder / "code")) for path in (folder / "code").rglob("*.py"))
    modules, third_party = serving_closure("msa.platform.tracking.pyfunc")
    assert carried == sorted(module.replace(".", "/") + ".py" for module in modules)
    assert "msa/platform/tracking/pyfunc.py" in carried and "msa/models/fine.py" in carried
    # the prediction path only: nothing of the sweep, the registry side, tracking or ensembles
    assert not [path for path in carried if path.startswith(("msa/platform/sweep/", "msa/ensembles/"))
                or path in ("msa/platform/tracking/registry.py", "msa/platform/tracking/client.py",
                            "msa/platform/training/loop.py", "msa/platform/training/engine.py")]
    assert third_party == {"numpy", "torch", "yaml"}
    pinned = {"PyYAML", "mlflow", "numpy", "torch"}
    assert (folder / "requirements.txt").read_text().split() == sorted(
        f"{name}=={metadata.version(name).split('+')[0]}" for name in pinned)


def test_it_loads_and_predicts_where_import_msa_fails_exactly_as_msa_predict(sweep, clean_env, tmp_path):
    clean_env.forget_guarded_imports()
    refused = clean_env.run("import msa", cwd=tmp_path)
    assert refused.returncode == 1 and "No module named 'msa'" in refused.stderr

    # and neither Ray, Optuna nor DeepSpeed is even tried there
    check_serves_like_msa_predict(clean_env, MODEL_URI, sweep["uri"], sweep["data"],
                                  cwd=tmp_path)


def test_mlflow_models_serve_answers_invocations_with_msa_predicts_predictions(sweep, clean_env, tmp_path):
    clean_env.forget_guarded_imports()
    data = sweep["data"]
    inputs = serving_inputs(MODEL_URI, sweep["uri"], data, "test")
    batches = [{name: value[k * 4:(k + 1) * 4] for name, value in inputs.items()} for k in range(8)] * 4
    with served(clean_env, MODEL_URI, sweep["uri"], cwd=tmp_path) as base:
        answered = invoke(base, invocations_body(inputs))
        again = invoke(base, invocations_body({name: value[:5] for name, value in inputs.items()}))
        with ThreadPoolExecutor(max_workers=8) as clients:  # 32 requests from 8 clients at once
            at_once = list(clients.map(lambda batch: invoke(base, invocations_body(batch)), batches))
    expected = msa_predictions(MODEL_URI, sweep["uri"], data, "test", out=tmp_path / "msa_predict.csv")
    assert np.array_equal(answered, expected)
    # a request of other clips is what msa predicts for those clips (msa predict reads whole
    # splits; a batch's float sums, hence its last bits, depend on the rows it holds)
    first_five = {name: value[:5] for name, value in inputs.items()}
    model = load_registered(MODEL_URI, sweep["uri"])
    assert np.array_equal(again, model.predict(first_five).astype(np.float64))
    for batch, answer in zip(batches, at_once, strict=True):  # no answer mixed up between requests
        assert np.array_equal(answer, model.predict(batch).astype(np.float64))
    assert clean_env.guarded_imports() == []
