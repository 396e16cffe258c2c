"""The checkpoint folder contract, written by a real DeepSpeed run on the CPU: what each file
holds (read raw), and `Checkpoint`, the one reader, agreeing with the files, verifying the
weights' SHA-256 and refusing what is not a checkpoint."""
from __future__ import annotations

import csv
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from msa.models.registry import build_model
from msa.platform.core.errors import MsaError
from msa.platform.core.metrics import compute_metrics
from msa.platform.data.readers import load_dataset
from msa.platform.training.checkpoint import Checkpoint
from msa.platform.training.loop import train_loop


@pytest.fixture(scope="module")
def trained(synth_regression_pkl, tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoint") / "run"
    return out, train_loop({"data": str(synth_regression_pkl), "out": str(out), "epochs": 3})


def read_predictions(path):
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    return [r["id"] for r in rows], np.array([float(r["prediction"]) for r in rows])


def test_checkpoint_holds_weights_config_predictions_and_hash(trained, synth_regression_pkl):
    out, result = trained
    dataset = load_dataset(synth_regression_pkl)

    weights = (out / "model.pt").read_bytes()
    assert result.weights_sha256 == hashlib.sha256(weights).hexdigest()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["weights_sha256"] == result.weights_sha256
    state = torch.load(out / "model.pt", weights_only=True)
    assert set(state) == set(build_model("baseline", dataset.spec).state_dict())

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"] == "baseline" and config["selection_metric"] == "mae"
    assert config["precision"] == "fp32" and config["model_config"] == {"hidden": 64, "dropout": 0.1}
    assert config["data_spec"]["dims"] == {"text": 32, "audio": 12, "vision": 16}

    for split in ("valid", "test"):
        ids, predictions = read_predictions(out / f"predictions_{split}.csv")
        assert ids == dataset.splits[split].ids.tolist()
        recomputed = compute_metrics("mosi", predictions, dataset.splits[split].labels)
        assert recomputed["mae"] == pytest.approx(metrics[split]["mae"], abs=1e-6)
    assert metrics["best_epoch"] == result.best_epoch
    assert metrics["valid"]["mae"] == min(r["valid_mae"] for r in result.history)
    assert not list(out.parent.glob(".*partial"))
    # The optimisation steps' own time is recorded beside the whole epoch's (valid prediction, checkpoint).
    assert all(0 < r["training_seconds"] < r["epoch_seconds"] for r in result.history)




def test_the_reader_agrees_with_the_files(trained, synth_regression_pkl):
    out, result = trained
    checkpoint = Checkpoint(out)
    dataset = load_dataset(synth_regression_pkl)
    assert checkpoint.exists() and checkpoint.metrics == json.loads((out / "metrics.json").read_text())
    assert checkpoint.spec == dataset.spec and checkpoint.selection_metric == "mae"
    assert "data_spec" not in checkpoint.train_config() and checkpoint.train_config()["epochs"] == 3
    for split in ("valid", "test"):
        stored = checkpoint.predictions(split)
        assert stored.ids == tuple(dataset.splits[split].ids)
        np.testing.assert_allclose(stored.labels, dataset.splits[split].labels, rtol=1e-6)
        assert compute_metrics("mosi", stored.values, stored.labels)["mae"] == pytest.approx(result.valid_metrics["mae"]
                                                                                          if split == "valid" else result.test_metrics["mae"], abs=1e-6)
    assert checkpoint.epoch_seconds() == pytest.approx(sum(r["epoch_seconds"] for r in result.history), rel=1e-6)
    assert checkpoint.verified_weights("check") == out / "model.pt"


def test_modified_weights_and_a_folder_that_is_no_checkpoint_are_refused(trained, tmp_path):
    out, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with (copy / "model.pt").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(MsaError, match=r"^member x: SHA-256 of .*model\.pt is [0-9a-f]{16}\.\.\. but metrics\.json recorded"):
        Checkpoint(copy).verified_weights("member x")
    (copy / "model.pt").unlink()
    with pytest.raises(MsaError, match=r"weights .*model\.pt are missing"):
        Checkpoint(copy).verified_weights("member x")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not Checkpoint(empty).exists()
    with pytest.raises(MsaError, match=r"has no readable metrics\.json"):
        Checkpoint(empty).verified_weights("member x")
    with pytest.raises(MsaError, match=r"is not a checkpoint folder \(no readable config\.yaml\)"):
        Checkpoint(empty).config
