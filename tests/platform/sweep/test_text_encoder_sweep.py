"""Sweeps with a text encoder, on real Ray, Optuna, DeepSpeed and MLflow with the tiny BERT: the
search space varies the encoder's learning rate and frozen layers, trials read the driver's
token ids and frozen prefixes, the study's best is registered and serves raw text; and a
two-worker ZeRO-2 trial trains the encoder in the DeepSpeed engine."""
from __future__ import annotations

import csv
import json
from importlib import metadata
from pathlib import Path

import mlflow.artifacts
import numpy as np
import optuna
import pytest
import torch
import yaml
from clean_env import check_serves_like_msa_predict

from msa.platform.cli import main
from msa.platform.core.metrics import compute_metrics
from msa.platform.data.readers import write_npz
from msa.platform.data.synth import synthesize
from msa.platform.sweep.config import load_sweep_config
from msa.platform.sweep.driver import run_sweep
from msa.platform.tracking.registry import load_registered
from msa.platform.tracking.server import MlflowServer
from msa.platform.training.checkpoint import Checkpoint
from msa.platform.training.text_encoder import load_encoder

SIZES = {"train": 64, "valid": 24, "test": 24}


def write_sweep(tmp_path: Path, encoder: Path, **sections) -> Path:
    data = tmp_path / "synth_regression.npz"
    write_npz(synthesize("regression", seed=0, sizes=SIZES), data)
    config = {"name": "te", "storage": str(tmp_path / "sweeps"), "datasets": [str(data)], "models": ["baseline"],
              "train": {"patience": 5, "batch_size": 16, "text_encoder": {"path": str(encoder), "max_length": 12}},
              **sections}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def encoder_sweep(ray_runtime, tmp_path_factory, tiny_bert):
    """4 random trials of the baseline whose search space varies the encoder's lr and depth."""
    tmp_path = tmp_path_factory.mktemp("encoder-sweep")
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "lr": {"type": "log_float", "low": 1e-3, "high": 1e-2},
        "text_encoder.lr": {"type": "log_float", "low": 1e-4, "high": 1e-3},
        "text_encoder.freeze_layers": {"type": "int", "low": 0, "high": 2},
    }))
    config = load_sweep_config(write_sweep(
        tmp_path, tiny_bert, budget={"trials_per_pair": 4, "max_epochs": 2},
        search={"sampler": "random", "seed": 1, "scheduler": "none", "spaces": {"baseline": str(space)}},
        resources={"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": 2},
    ))
    return run_sweep(config), tmp_path


def test_a_sweep_searches_the_encoders_learning_rate_and_frozen_layers_and_serves_raw_text(
        encoder_sweep, tiny_bert, clean_env, tmp_path, capsys):
    result, data_dir = encoder_sweep
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
    assert main(["predict", "--model", champion, "--data", str(data_dir / "synth_regression.npz"),
                 "--split", "test", "--out", str(out), "--run-dir", str(result.run_dir.root)]) == 0
    with out.open(newline="") as handle:
        served = [float(row["prediction"]) for row in csv.DictReader(handle)]
    np.testing.assert_array_equal(served, best.predictions("test").values)  # from raw text, bit for bit
    with MlflowServer(result.run_dir.root) as server:
        signature = load_registered(champion, server.uri).metadata.signature
        # where msa-sweep is not installed, loaded and served: raw text in, the same predictions out
        check_serves_like_msa_predict(clean_env, champion, server.uri, data_dir / "synth_regression.npz",
                                      cwd=tmp_path, serve=True)
        mlflow.set_tracking_uri(server.uri)
        mlflow.set_registry_uri(server.uri)
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=champion, dst_path=str(tmp_path / "model")))
        requirements = (folder / "requirements.txt").read_text().split()
    names = [tensor.name for tensor in signature.inputs.inputs]
    assert "raw_text" in names and "text" not in names and "audio" in names
    assert f"transformers=={metadata.version('transformers')}" in requirements


def test_a_two_worker_zero2_trial_trains_the_encoder_inside_the_deepspeed_engine(ray_runtime, tmp_path, tiny_bert):
    config = load_sweep_config(write_sweep(
        tmp_path, tiny_bert, budget={"trials_per_pair": 1, "max_epochs": 2},
        search={"sampler": "random", "seed": 0, "scheduler": "none"},
        resources={"workers_per_trial": 2, "cpus_per_worker": 1, "max_concurrent_trials": 1},
        deepspeed={"zero_stage": 2},
    ))
    result = run_sweep(config)
    (pair,) = result.pairs
    assert pair.complete == 1
    checkpoint = Checkpoint(pair.best_checkpoint)
    assert checkpoint.config["zero_stage"] == 2 and checkpoint.config["text_encoder"]["freeze_layers"] == 0
    weights = torch.load(checkpoint.verified_weights("test"), weights_only=True)
    pretrained = load_encoder(tiny_bert).state_dict()
    assert not torch.equal(weights["encoder.encoder.layer.0.attention.self.query.weight"],
                           pretrained["encoder.layer.0.attention.self.query.weight"])  # fine-tuned across 2 ranks
    # ZeRO-2 partitions the optimizer state, encoder included, over the two ranks
    assert list((result.run_dir.root / "train").rglob("zero_pp_rank_1_*optim_states.pt"))


def test_the_registered_ensemble_of_encoder_models_serves_raw_text(encoder_sweep, clean_env, tmp_path, capsys):
    result, data_dir = encoder_sweep
    run_dir = result.run_dir.root
    assert main(["ensemble", str(run_dir), "--top-k", "3", "--seeds", "2", "--folds", "3", "--bootstrap", "200"]) == 0
    board = json.loads((run_dir / "ensembles" / "leaderboard.json").read_text())
    (entry,) = board["datasets"]
    registered = next(r for r in entry["rows"] if r.get("registered"))
    out = tmp_path / "ensemble.csv"
    assert main(["predict", "--model", "models:/msa-ensemble-synth_regression@champion", "--run-dir", str(run_dir),
                 "--data", str(data_dir / "synth_regression.npz"), "--split", "test", "--out", str(out)]) == 0
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    served = np.asarray([float(r["prediction"]) for r in rows])
    truth = np.asarray([float(r["label"]) for r in rows])
    assert compute_metrics("mosi", served, truth) == pytest.approx(registered["test"])
    with MlflowServer(run_dir) as server:
        check_serves_like_msa_predict(clean_env, "models:/msa-ensemble-synth_regression@champion", server.uri,
                                      data_dir / "synth_regression.npz", cwd=tmp_path)
