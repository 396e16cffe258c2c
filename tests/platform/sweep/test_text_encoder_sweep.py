"""Sweeps with a text encoder, on real Ray, Optuna, DeepSpeed and MLflow with the tiny BERT: the
search space varies the encoder's learning rate and frozen layers, trials read the driver's
token ids and frozen prefixes, the study's best is registered and serves raw text, and so does the
ensemble of its trials. A two-worker ZeRO-2 trial training the encoder inside the DeepSpeed
engine, with a worker killed: test_driver.py."""
from __future__ import annotations

import csv
import dataclasses
import json
from importlib import metadata
from pathlib import Path

import mlflow.artifacts
import numpy as np
import optuna
import pytest
import yaml
from clean_env import check_serves_like_msa_predict
from helpers import sweep_config, synth_data

from msa.platform.cli import main
from msa.platform.core.metrics import compute_metrics
from msa.platform.data.readers import load_dataset
from msa.platform.sweep.config import load_sweep_config
from msa.platform.sweep.driver import SweepSession, run_sweep
from msa.platform.sweep.text_inputs import materialize
from msa.platform.tracking.registry import load_registered
from msa.platform.training.checkpoint import Checkpoint
from msa.platform.training.config import TextEncoderConfig, TrainConfig

SIZES = {"train": 64, "valid": 24, "test": 24}


@pytest.fixture(scope="module")
def encoder_sweep(ray_runtime, mlflow_server, tmp_path_factory, tiny_bert):
    """4 random trials of the baseline whose search space varies the encoder's lr and depth, on
    `encoded.npz` (synthetic, with transcripts), logged to the session's server. A sweep of its
    own: the reference sweep has no text encoder."""
    tmp_path = tmp_path_factory.mktemp("encoder-sweep")
    data = synth_data(tmp_path, "encoded", sizes=SIZES, suffix=".npz")
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "lr": {"type": "log_float", "low": 1e-3, "high": 1e-2},
        "text_encoder.lr": {"type": "log_float", "low": 1e-4, "high": 1e-3},
        "text_encoder.freeze_layers": {"type": "int", "low": 0, "high": 2},
    }))
    config = sweep_config(
        tmp_path, name="te", datasets=[str(data)],
        train={"batch_size": 16, "text_encoder": {"path": str(tiny_bert), "max_length": 12}},
        budget={"trials_per_pair": 4}, search={"sampler": "random", "seed": 1, "spaces": {"baseline": str(space)}},
        resources={"cpus_per_worker": 1, "max_concurrent_trials": 2}, tracking={"uri": mlflow_server.uri},
    )
    return run_sweep(config), data


def test_a_sweep_searches_the_encoders_learning_rate_and_frozen_layers_and_serves_raw_text(
        encoder_sweep, mlflow_client, tiny_bert, clean_env, tmp_path, capsys):
    result, data = encoder_sweep
    (pair,) = result.pairs
    assert pair.complete == 4
    study = optuna.load_study(study_name=pair.pair, storage=result.run_dir.study_url(pair.pair))
    depths = set()
    for trial in study.trials:
        checkpoint = Checkpoint(result.run_dir.trial(pair.pair, trial.user_attrs["ray_trial_id"]))
        encoder = checkpoint.config["text_encoder"]
        assert encoder["lr"] == trial.params["text_encoder/lr"] and encoder["path"] == str(tiny_bert)
        assert encoder["freeze_layers"] == trial.params["text_encoder/freeze_layers"]
        # the driver's prefix of that depth, not the ids, when layers are frozen
        assert checkpoint.text_encoding["prefix_layers"] == encoder["freeze_layers"]
        depths.add(encoder["freeze_layers"])
    assert len(depths) > 1, "the random sampler drew one depth only; pick another seed"

    best = Checkpoint(pair.best_checkpoint)
    champion = f"models:/msa-{pair.pair}@champion"
    out = tmp_path / "predictions.csv"
    capsys.readouterr()
    assert main(["predict", "--model", champion, "--data", str(data), "--split", "test", "--out", str(out),
                 "--tracking-uri", mlflow_client.tracking_uri]) == 0
    with out.open(newline="") as handle:
        served = [float(row["prediction"]) for row in csv.DictReader(handle)]
    np.testing.assert_array_equal(served, best.predictions("test").values)  # from raw text, bit for bit
    uri = mlflow_client.tracking_uri
    signature = load_registered(champion, uri).metadata.signature
    # where msa-sweep is not installed, loaded and served: raw text in, the same predictions out
    check_serves_like_msa_predict(clean_env, champion, uri, data, cwd=tmp_path, serve=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=champion, dst_path=str(tmp_path / "model")))
    requirements = (folder / "requirements.txt").read_text().split()
    names = [tensor.name for tensor in signature.inputs.inputs]
    assert "raw_text" in names and "text" not in names and "audio" in names
    assert f"transformers=={metadata.version('transformers')}" in requirements


def test_the_registered_ensemble_of_encoder_models_serves_raw_text(encoder_sweep, mlflow_client, clean_env, tmp_path):
    result, data = encoder_sweep
    run_dir, uri = result.run_dir.root, mlflow_client.tracking_uri
    assert main(["ensemble", str(run_dir), "--top-k", "3", "--seeds", "2", "--folds", "3", "--bootstrap", "200"]) == 0
    board = json.loads((run_dir / "ensembles" / "leaderboard.json").read_text())
    (entry,) = board["datasets"]
    registered = next(r for r in entry["rows"] if r.get("registered"))
    out = tmp_path / "ensemble.csv"
    assert main(["predict", "--model", "models:/msa-ensemble-encoded@champion", "--tracking-uri", uri,
                 "--data", str(data), "--split", "test", "--out", str(out)]) == 0
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    served = np.asarray([float(r["prediction"]) for r in rows])
    truth = np.asarray([float(r["label"]) for r in rows])
    assert compute_metrics("mosi", served, truth) == pytest.approx(registered["test"])
    check_serves_like_msa_predict(clean_env, "models:/msa-ensemble-encoded@champion", uri, data, cwd=tmp_path)


def test_a_second_sweep_on_the_same_data_computes_no_prefix(encoder_sweep, capsys):
    """The same sweep again: its token ids and both prefix depths are cache hits, the console
    says so, no entry is made, and a trial reads its depth memory-mapped in float16."""
    result, _ = encoder_sweep
    session = SweepSession(load_sweep_config(result.run_dir.config_file))
    before = session.text_plan.cache.entries()
    capsys.readouterr()
    inputs = materialize(session.text_plan, session.datasets, ship=False, remote=False)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == [
        "[text cache] encoded token ids", "[text cache] encoded depth 1", "[text cache] encoded depth 2"]
    assert all(": cache hit (" in line for line in printed)
    assert session.text_plan.cache.entries() == before
    dataset = inputs["encoded"].load(TrainConfig(text_encoder=TextEncoderConfig(path="unused", freeze_layers=1)))
    text = dataset.splits["train"].features["text"]
    assert isinstance(text, np.memmap) and text.dtype == np.float16 and dataset.text_encoding.prefix_layers == 1


def test_on_a_cluster_a_ray_task_computes_the_prefixes_and_they_ship_through_the_object_store(
        encoder_sweep, tmp_path, capsys):
    """What a joined cluster does (`remote`, `ship`), on the session's runtime: the missing depths
    come from the Ray task on the driver's node, and a trial on a node that does not see the cache
    folder reads the same arrays from the object store."""
    result, _ = encoder_sweep
    session = SweepSession(load_sweep_config(result.run_dir.config_file))
    fresh = {"fresh": load_dataset(synth_data(tmp_path, "fresh", sizes={"train": 20, "valid": 8, "test": 8}))}
    inputs = materialize(session.text_plan, fresh, ship=True, remote=True)["fresh"]
    printed = capsys.readouterr().out
    assert "fresh depth 1: computed in" in printed and "fresh depth 2: computed in" in printed
    config = TrainConfig(text_encoder=TextEncoderConfig(path="unused", freeze_layers=2))
    from_folder = inputs.load(config).splits["valid"].features["text"]
    away = dataclasses.replace(inputs, prefixes={k: str(tmp_path / "not-on-this-node") for k in inputs.prefixes})
    shipped = away.load(config).splits["valid"].features["text"]
    assert not isinstance(shipped, np.memmap) and shipped.dtype == np.float16
    np.testing.assert_array_equal(shipped, from_folder)
