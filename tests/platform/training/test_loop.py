"""The training loop through real DeepSpeed on the CPU: reproducibility, early stopping, ZeRO
stages, classification, resuming, and the failures it must report cleanly (the checkpoint folder
it writes: test_checkpoint.py)."""
from __future__ import annotations

import csv
import json
import statistics

import numpy as np
import pytest
import torch

from msa.platform.core.errors import MsaError
from msa.platform.training.checkpoint import Checkpoint, SeedGroup
from msa.platform.training.loop import train_loop, train_seed_group
from msa.platform.training.run import NonFiniteLossError


def test_same_seed_same_run_and_other_seed_differs(synth_regression_pkl, tmp_path):
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        train_loop({"data": str(synth_regression_pkl), "out": str(tmp_path / name), "epochs": 2, "seed": seed})
        runs[name] = Checkpoint(tmp_path / name).predictions("test").values
    np.testing.assert_array_equal(runs["a"], runs["b"])
    assert not np.array_equal(runs["a"], runs["c"])


def test_early_stopping_stops_after_patience(synth_regression_pkl, tmp_path):
    result = train_loop(
        {"data": str(synth_regression_pkl), "out": str(tmp_path / "run"), "epochs": 40, "patience": 2, "lr": 0.02}
    )
    last = int(result.history[-1]["epoch"])
    assert last < 40, "a high learning rate on 96 clips should stop improving long before 40 epochs"
    assert last - result.best_epoch == 2
    improved = [int(r["epoch"]) for r in result.history if r["improved"]]
    assert improved[-1] == result.best_epoch


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_zero_stages_train_and_checkpoint(synth_regression_pkl, tmp_path, zero_stage):
    out = tmp_path / f"zero{zero_stage}"
    result = train_loop(
        {"data": str(synth_regression_pkl), "out": str(out), "epochs": 2, "zero_stage": zero_stage}
    )
    state = torch.load(out / "model.pt", weights_only=True)
    assert all(t.numel() > 0 for t in state.values()), "ZeRO-3 weights must be gathered before saving"
    assert np.isfinite(result.valid_metrics["mae"])


def test_classification_learns(synth_classification_npz, tmp_path):
    out = tmp_path / "cls"
    result = train_loop({"data": str(synth_classification_npz), "out": str(out), "epochs": 15, "lr": 3e-3})
    assert result.selection_metric == "acc"
    assert result.test_metrics["acc"] > 30.0  # chance is 5 %
    with (out / "predictions_test.csv").open() as handle:
        header = next(csv.reader(handle))
    assert header[:3] == ["id", "label", "prediction"] and len(header) == 3 + 20


def test_existing_output_folder_is_refused(synth_regression_pkl, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(MsaError, match="already exists"):
        train_loop({"data": str(synth_regression_pkl), "out": str(out)})
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_stale_trial_folder_is_replaced_when_the_caller_owns_it(synth_regression_pkl, tmp_path):
    out = tmp_path / "trial"
    out.mkdir()
    (out / "model.pt").write_text("left by an attempt that never saved its state")
    result = train_loop({"data": str(synth_regression_pkl), "out": str(out), "epochs": 2}, replace_stale_out=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["weights_sha256"] == result.weights_sha256
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.yaml", "history.csv", "metrics.json", "model.pt", "predictions_test.csv", "predictions_valid.csv"]
    )


def test_nonfinite_loss_fails_cleanly(synth_regression_pkl, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match="epoch"):
        train_loop({"data": str(synth_regression_pkl), "out": str(out), "epochs": 5, "lr": 1e30, "grad_clip": 0.0})
    assert not out.exists() and not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"selection_metric": "acc"}, "not a mosi metric"),
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"model_config": {"hiden": 3}}, "unknown key 'hiden'"),
        ({"zero_stage": 4}, "zero_stage"),
        ({"model": "nope"}, "unknown model 'nope'"),
    ],
)
def test_bad_config_fails_before_any_work(synth_regression_pkl, tmp_path, overrides, message):
    out = tmp_path / "run"
    with pytest.raises(MsaError, match=message):
        train_loop({"data": str(synth_regression_pkl), "out": str(out), **overrides})
    assert not out.exists()


def test_resumed_run_continues_exactly(synth_regression_pkl, tmp_path):
    """State saved after epoch 2 and resumed gives the same epochs 3-4 as an uninterrupted run."""
    state_dir = tmp_path / "state"

    def save_at_epoch_2(record, save_state):
        if record["epoch"] == 2:
            state_dir.mkdir()
            save_state(state_dir)

    base = {"data": str(synth_regression_pkl), "epochs": 4, "patience": 10, "seed": 3}
    full = train_loop({**base, "out": str(tmp_path / "full")}, on_epoch=save_at_epoch_2)
    resumed = train_loop({**base, "out": str(tmp_path / "resumed")}, resume_from=state_dir)
    assert [int(r["epoch"]) for r in resumed.history] == [1, 2, 3, 4]
    for uninterrupted, continued in zip(full.history[2:], resumed.history[2:]):
        assert continued["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=1e-6)
        assert continued["valid_mae"] == pytest.approx(uninterrupted["valid_mae"], rel=1e-6)
    assert resumed.history[-1]["final"] == 1.0 and full.history[1]["final"] == 0.0


def test_resume_from_a_folder_without_state_is_refused(synth_regression_pkl, tmp_path):
    with pytest.raises(MsaError, match="not a resumable training state"):
        train_loop({"data": str(synth_regression_pkl), "out": str(tmp_path / "run")}, resume_from=tmp_path)


def test_a_seed_group_trains_each_seed_as_it_trains_alone(synth_regression_pkl, tmp_path):
    """Three seeds in lock-step in one process: each seed's weights are bit for bit those of
    `train_loop` with that seed alone (its own RNG stream and batch order), the seeds differ,
    and the group's record is the seed mean of the best valid score."""
    base = {"data": str(synth_regression_pkl), "epochs": 3, "patience": 10, "seed": 5, "model_config": {"dropout": 0.3}}
    records = []
    group = train_seed_group({**base, "seeds": 3, "out": str(tmp_path / "group")},
                             on_epoch=lambda record, _save: records.append(record))
    assert [r.out_dir.name for r in group] == ["seed-5", "seed-6", "seed-7"]
    alone = [train_loop({**base, "seed": seed, "out": str(tmp_path / f"alone{seed}")}) for seed in (5, 6, 7)]
    assert [r.weights_sha256 for r in group] == [r.weights_sha256 for r in alone]
    assert len({r.weights_sha256 for r in group}) == 3
    stored = SeedGroup(tmp_path / "group")
    assert stored.exists() and stored.seeds == [5, 6, 7]
    assert stored.checkpoints[0].metrics["seed_group"] == [5, 6, 7]
    for record in records:
        epoch = int(record["epoch"])
        bests = [min(h["valid_mae"] for h in r.history[:epoch]) for r in group]
        assert record["best_valid_mae"] == pytest.approx(statistics.mean(bests), rel=1e-12)
        assert [record[f"seed{s}_best_valid_mae"] for s in (5, 6, 7)] == pytest.approx(bests, rel=1e-12)
    assert records[-1]["final"] == 1.0 and records[0]["final"] == 0.0
    assert stored.mean("valid")["mae"] == pytest.approx(records[-1]["best_valid_mae"], rel=1e-12)


def test_a_resumed_seed_group_continues_every_seed_exactly(synth_regression_pkl, tmp_path):
    state_dir = tmp_path / "state"

    def save_at_epoch_2(record, save_state):
        if record["epoch"] == 2:
            save_state(state_dir)

    base = {"data": str(synth_regression_pkl), "epochs": 4, "patience": 10, "seed": 0, "seeds": 2}
    full = train_seed_group({**base, "out": str(tmp_path / "full")}, on_epoch=save_at_epoch_2)
    assert sorted(p.name for p in state_dir.iterdir()) == ["seed-0", "seed-1"]
    resumed = train_seed_group({**base, "out": str(tmp_path / "resumed")}, resume_from=state_dir)
    for uninterrupted, continued in zip(full, resumed):
        assert [h["train_loss"] for h in continued.history[2:]] == \
            pytest.approx([h["train_loss"] for h in uninterrupted.history[2:]], rel=1e-6)


def test_train_loop_refuses_a_seed_group(synth_regression_pkl, tmp_path):
    with pytest.raises(MsaError, match="seeds=2 trains a seed group"):
        train_loop({"data": str(synth_regression_pkl), "out": str(tmp_path / "run"), "seeds": 2})
    assert not (tmp_path / "run").exists()


def test_a_group_resumed_from_its_last_epoch_trains_nothing_more(synth_regression_pkl, tmp_path):
    """A trial killed after reporting its final epoch resumes from that state: every seed has
    finished, so nothing is trained or reported again."""
    state_dir = tmp_path / "state"
    base = {"data": str(synth_regression_pkl), "epochs": 3, "patience": 10, "seeds": 2}
    train_seed_group({**base, "out": str(tmp_path / "full")},
                     on_epoch=lambda record, save: save(state_dir) if record["final"] else None)
    reported = []
    resumed = train_seed_group({**base, "out": str(tmp_path / "resumed")}, resume_from=state_dir,
                               on_epoch=lambda record, _save: reported.append(record))
    assert reported == [] and [len(r.history) for r in resumed] == [3, 3]
