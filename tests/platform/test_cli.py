"""The `msa` command line: the real console script end to end (`msa train`), the other commands
through `main` as the console script calls it (`msa train`'s progress lines on stderr too), and
every bad input the issue names ending in one line on stderr, exit status 2, and nothing written."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from msa.platform.cli import main
from msa.platform.data.readers import load_dataset, write_npz
from msa.platform.data.synth import synthesize

SIZES = {"train": 24, "valid": 8, "test": 8}


def test_train_on_mosi_lite_beats_the_train_mean(driver, mosi_lite_path, tmp_path):
    """`msa train --model baseline --data mosi_lite.npz` through DeepSpeed; train-mean MAE is 1.464.
    (The console script in a process of its own: what a user runs.)"""
    out = tmp_path / "run"
    proc = driver.run("train", "--model", "baseline", "--data", str(mosi_lite_path), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = dict(
        (line.split()[0], line.split()[1:]) for line in proc.stdout.splitlines()
        if line.split() and line.split()[0] in ("mae", "acc2_non0", "corr")
    )
    test_mae = float(table["mae"][1])
    assert test_mae < 1.464
    assert float(table["corr"][1]) > 0.5
    assert (out / "model.pt").is_file() and "checkpoint:" in proc.stdout


def test_train_shows_each_tenth_of_every_epochs_batches_on_stderr(synth_regression_pkl, tmp_path, capsys):
    """Not a terminal (captured): a plain line per tenth of the batches; 96 clips in batches of 8
    are 12 batches, so a line at the first batch count in each tenth, 10% to 100%, each epoch."""
    import re

    out = tmp_path / "run"
    assert main(["train", "--model", "baseline", "--data", str(synth_regression_pkl), "--out", str(out),
                 "epochs=2", "batch_size=8", "patience=5"]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if re.match(r"epoch \d+/2: batch ", line)]
    plain = r"epoch (\d)/2: batch (\d+)/12 \((\d+)%\), \d+:\d\d elapsed, ETA \d+:\d\d, [\d.]+ (?:batch/s|s/batch)$"
    found = [re.match(plain, line).groups() for line in lines]
    done = [2, 3, 4, 5, 6, 8, 9, 10, 11, 12]
    assert found == [(epoch, str(n), str(100 * n // 12)) for epoch in "12" for n in done]
    assert [int(percent) // 10 for _, _, percent in found[:10]] == list(range(1, 11))
    assert "batch" not in captured.out and "epoch   2  loss" in captured.out


def test_synth_then_inspect(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["data", "synth", "--task", "classification", "--out", "c.pkl", "--train", "40"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", "c.pkl"]) == 0
    out = capsys.readouterr().out
    assert "classification" in out and "20 classes" in out
    assert "[train] 40 clips" in out and "vision" in out


def test_synth_writes_cmu_mosei_shapes_with_real_length_transcripts(tmp_path):
    out = tmp_path / "mosei_like.pkl"
    assert main(["data", "synth", "--out", str(out), "--train", "30", "--valid", "5", "--test", "7",
                 "--dims", "text=768,audio=74,vision=35", "--lengths", "text=50,audio=40", "--words", "8-40"]) == 0
    dataset = load_dataset(out)
    shapes = {m: dataset.splits["test"].features[m].shape for m in dataset.modalities}
    assert shapes == {"text": (7, 50, 768), "audio": (7, 40, 74), "vision": (7, 30, 35)}  # vision: the default 30 steps
    words = [len(text.split()) for split in dataset.splits.values() for text in split.raw_text]
    assert 9 <= min(words) and max(words) <= 42 and max(words) > 20  # 8-40 fillers plus 1-2 carriers


def test_models_lists_the_registry(capsys):
    from msa.models.registry import MODELS

    assert main(["models"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(MODELS)


def _npz_with(tmp_path: Path, name: str, edit) -> Path:
    """Write a small synthetic npz, with `edit(arrays)` applied to its raw arrays."""
    path = tmp_path / "base.npz"
    write_npz(synthesize("regression", seed=1, sizes=SIZES), path)
    arrays = dict(np.load(path, allow_pickle=False))
    edit(arrays)
    out = tmp_path / name
    np.savez(out, **arrays)
    path.unlink()
    return out


def _bad_file(kind: str, tmp_path: Path) -> tuple[list[str], str]:
    """(extra CLI args, expected message fragment) for one bad input."""
    if kind == "missing file":
        return ["--data", str(tmp_path / "nope.pkl")], "data file not found"
    if kind == "not a pickle or npz":
        (tmp_path / "notes.txt").write_text("hello")
        return ["--data", str(tmp_path / "notes.txt")], "not an .npz archive, an MMSA pickle"
    if kind == "pickle without MMSA keys":
        with (tmp_path / "x.pkl").open("wb") as handle:
            pickle.dump({"features": [1, 2, 3]}, handle)
        return ["--data", str(tmp_path / "x.pkl")], "lacks the MMSA keys"
    if kind == "split missing":
        path = _npz_with(tmp_path, "nosplit.npz", lambda a: [a.pop(k) for k in list(a) if k.startswith("valid_")])
        return ["--data", str(path)], "split 'valid' is missing"
    if kind == "dims inconsistent":
        path = _npz_with(tmp_path, "dims.npz", lambda a: a.update(test_audio=a["test_audio"][:, :, :5]))
        return ["--data", str(path)], "modality 'audio': feature dim 5 differs from train's 12"
    if kind == "nan features":
        def poison(a):
            a["train_vision"] = a["train_vision"].copy()
            a["train_vision"][3, 0, 0] = np.nan
        return ["--data", str(_npz_with(tmp_path, "nan.npz", poison))], "NaN or inf features"
    if kind == "inf features":
        def poison(a):
            a["valid_text"] = a["valid_text"].copy()
            a["valid_text"][0, 0, 1] = np.inf
        return ["--data", str(_npz_with(tmp_path, "inf.npz", poison))], "NaN or inf features"
    if kind == "labels out of range":
        path = _npz_with(tmp_path, "range.npz", lambda a: a.update(train_regression_labels=a["train_regression_labels"] * 3))
        return ["--data", str(path)], r"out of range \[-3, 3\]"
    raise AssertionError(kind)


BAD_DATA = [
    "missing file", "not a pickle or npz", "pickle without MMSA keys", "split missing",
    "dims inconsistent", "nan features", "inf features", "labels out of range",
]


def assert_one_line_error(capsys, code: int, fragment: str) -> None:
    import re

    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("msa: error: "), captured.err
    assert re.search(fragment, lines[0]), lines[0]


@pytest.mark.parametrize("kind", BAD_DATA)
def test_bad_data_is_one_line_error_and_nothing_written(kind, tmp_path, capsys):
    args, fragment = _bad_file(kind, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "run"
    code = main(["train", "--model", "baseline", *args, "--out", str(out)])
    assert_one_line_error(capsys, code, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert main(["data", "inspect", args[1]]) == 2


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["train", "--model", "nosuchmodel", "--data", "x.npz"],
         "unknown model 'nosuchmodel'; registered models: baseline, dbr, fine, invariant, tfn"),
        (["train", "--data", "DATA", "bogus_key=3"], "unknown key 'bogus_key'"),
        (["train", "--data", "DATA", "model_config.width=3"], "unknown key 'width'"),
        (["train", "--data", "DATA", "lr"], "not of the form key=value"),
        (["train", "--data", "DATA", "epochs=many"], "key 'epochs': expected an integer"),
        (["data", "synth", "--out", "x.csv"], "use a .pkl"),
        (["data", "synth", "--out", "x.pkl", "--dims", "text=768,smell=3"], "--dims 'text=768,smell=3': give modality="),
        (["data", "synth", "--out", "x.pkl", "--dims", "text=8", "--lengths", "audio=5"], "--lengths names audio"),
        (["data", "synth", "--out", "x.pkl", "--words", "9-3"], "--words '9-3': give MIN-MAX"),
        (["nosuchcommand"], "invalid choice"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, fragment, synth_regression_pkl, tmp_path, capsys):
    argv = [str(synth_regression_pkl) if a == "DATA" else a for a in argv]
    os.chdir(tmp_path)
    assert_one_line_error(capsys, main(argv), fragment)
    assert not any(tmp_path.iterdir())


def test_unknown_key_in_config_file_names_file_and_key(synth_regression_pkl, tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(f"data: {synth_regression_pkl}\nepochs: 2\nlearning_rate: 0.1\n")
    assert_one_line_error(capsys, main(["train", "--config", str(config)]), r"train\.yaml: unknown key 'learning_rate'")
    config.write_text("epochs: [1\n")
    assert_one_line_error(capsys, main(["train", "--config", str(config)]), "train.yaml: malformed YAML")


def test_config_file_and_overrides_compose(synth_regression_pkl, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(f"data: {synth_regression_pkl}\nepochs: 5\nmodel_config:\n  hidden: 16\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out), "epochs=1", "model_config.dropout=0.0"]) == 0
    import yaml

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["epochs"] == 1 and resolved["model_config"] == {"hidden": 16, "dropout": 0.0}
    assert load_dataset(synth_regression_pkl).spec.dims == resolved["data_spec"]["dims"]
