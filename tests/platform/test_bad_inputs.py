"""Every bad input the `msa` command line can get, in one table: config YAML, search spaces, data
files, arguments, registry names and prediction inputs. Each must end with one line
``msa: error: ...`` naming the problem, exit status 2, and leave nothing behind: the folder the
command ran in holds exactly the inputs it held before.

Module-level checks (readers, search spaces, sweep configs) have finer tables in their own test
files; this one goes through `main`, as a user does.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import optuna
import pytest
from tiny_encoder import write_tiny_bert

from msa.platform.cli import main
from msa.platform.data.readers import write_mmsa_pickle, write_npz
from msa.platform.data.synth import synthesize

SIZES = {"train": 24, "valid": 8, "test": 8}
SWEEP = "name: bad\ndatasets: [synth_regression]\nmodels: [baseline]\nstorage: runs\n"


def data_pkl(folder: Path) -> str:
    write_mmsa_pickle(synthesize("regression", seed=1, sizes=SIZES), folder / "data.pkl")
    return "data.pkl"


def poisoned_npz(folder: Path) -> str:
    write_npz(synthesize("regression", seed=1, sizes=SIZES), folder / "clean.npz")
    arrays = dict(np.load(folder / "clean.npz", allow_pickle=False))
    arrays["train_text"] = arrays["train_text"].copy()
    arrays["train_text"][0, 0, 0] = np.nan
    np.savez(folder / "nan.npz", **arrays)
    (folder / "clean.npz").unlink()
    return "nan.npz"


def write(folder: Path, name: str, text: str) -> str:
    (folder / name).write_text(text)
    return name


def space_sweep(folder: Path, space: str) -> list[str]:
    """`msa sweep` of a config whose baseline search space is `space`."""
    write(folder, "space.yaml", space)
    return ["sweep", write(folder, "s.yaml", SWEEP + "search: {spaces: {baseline: space.yaml}}\n")]


def text_only_npz(folder: Path) -> str:
    write_npz(synthesize("regression", seed=1, sizes=SIZES, dims={"text": 8}, max_lengths={"text": 5}), folder / "text.npz")
    return "text.npz"


def text_only_sweep(folder: Path, command: str, model: str) -> list[str]:
    """`msa sweep` or `msa run` of `model` on a text-only dataset."""
    return [command, write(folder, "s.yaml", SWEEP.replace("[synth_regression]", f"[{text_only_npz(folder)}]")
                           .replace("[baseline]", f"[baseline, {model}]"))]


def keyless_pickle(folder: Path) -> str:
    with (folder / "keys.pkl").open("wb") as handle:
        pickle.dump({"features": [1, 2, 3]}, handle)
    return "keys.pkl"


def tiny_bert(folder: Path) -> str:
    write_tiny_bert(folder / "bert")
    return "bert"


def encoder_train(folder: Path, data: str, encoder: str, *settings: str) -> list[str]:
    """`msa train` of the baseline on `data` with the text encoder at `encoder`."""
    return ["train", "--model", "baseline", "--data", data, "--out", "run", f"text_encoder.path={encoder}", *settings]


def encoder_sweep(folder: Path, space: str) -> list[str]:
    """`msa sweep` of the baseline with the tiny encoder and `space` as its search space."""
    write(folder, "space.yaml", space)
    train = f"train: {{text_encoder: {{path: {tiny_bert(folder)}}}}}\n"
    return ["sweep", write(folder, "s.yaml", SWEEP + train + "search: {spaces: {baseline: space.yaml}}\n")]


def no_text_pkl(folder: Path) -> str:
    dataset = synthesize("regression", seed=1, sizes=SIZES)
    for split in dataset.splits.values():
        split.raw_text = None
    write_mmsa_pickle(dataset, folder / "no_text.pkl")
    return "no_text.pkl"


def bert_ids_only_pkl(folder: Path) -> str:
    """An MMSA pickle whose only text is text_bert ids (bert-base-uncased's, as MMSA ships them)."""
    dataset = synthesize("regression", seed=1, sizes=SIZES)
    for split in dataset.splits.values():
        ids = np.zeros((len(split), 3, 6), dtype=np.int64)
        ids[:, 0, :3], ids[:, 1, :3] = [101, 1996, 102], 1
        split.raw_text, split.text_bert = None, ids
    write_mmsa_pickle(dataset, folder / "bert_ids.pkl")
    return "bert_ids.pkl"


def tfn_run_dir(folder: Path) -> str:
    """An earlier sweep's run directory holding a study of TFN only."""
    (folder / "tfn-old" / "optuna").mkdir(parents=True)
    (folder / "tfn-old" / "sweep.yaml").write_text("name: old\n")
    optuna.create_study(study_name="tfn-x", storage=f"sqlite:///{folder / 'tfn-old' / 'optuna' / 'tfn-x.db'}")
    return "tfn-old"


# (id, build(folder) -> argv, the message must match this)
CASES = [
    # text encoders
    ("encoder-missing-folder", lambda f: encoder_train(f, data_pkl(f), "./models/bert"), r"no such folder models/bert"),
    ("encoder-not-in-cache", lambda f: encoder_train(f, data_pkl(f), "nobody/no-such-model"),
     r"no model 'nobody/no-such-model' in the local Hugging Face cache .*downloads are off"),
    ("encoder-not-a-model-folder", lambda f: encoder_train(f, data_pkl(f), write(f, "notes", "x") and "."),
     r"is not a Hugging Face model folder \(no config\.json\)"),
    ("encoder-no-raw-text", lambda f: encoder_train(f, no_text_pkl(f), tiny_bert(f)), r"no_text\.pkl: a text encoder needs"),
    ("encoder-ids-do-not-match", lambda f: encoder_train(f, bert_ids_only_pkl(f), tiny_bert(f)),
     r"text_bert ids .*do(es)? not match"),
    ("encoder-freeze-beyond-depth", lambda f: encoder_train(f, data_pkl(f), tiny_bert(f), "text_encoder.freeze_layers=3"),
     r"freeze_layers is 3 but the encoder .* has 2 layers"),
    ("encoder-freeze-beyond-depth-searched", lambda f: encoder_sweep(f, "text_encoder.freeze_layers: {type: int, low: 0, high: 4}\n"),
     r"space\.yaml: text_encoder\.freeze_layers is 4 but the encoder .* has 2 layers"),
    ("encoder-path-searched", lambda f: space_sweep(f, "text_encoder.max_length: {type: categorical, choices: [8, 16]}\n"),
     r"text_encoder\.max_length decides the token ids"),
    # sweep config YAML
    ("config-missing", lambda f: ["sweep", "nope.yaml"], r"config file not found: nope\.yaml"),
    ("config-malformed", lambda f: ["sweep", write(f, "s.yaml", SWEEP + "budget: {max_epochs: [3\n")],
     r"s\.yaml: malformed YAML"),
    ("config-unknown-key", lambda f: ["sweep", write(f, "s.yaml", SWEEP + "budgets: {}\n")], r"unknown key 'budgets'"),
    ("config-wrong-type", lambda f: ["sweep", write(f, "s.yaml", SWEEP + "budget: {max_epochs: many}\n")],
     r"key 'max_epochs': expected an integer, got 'many'"),
    ("config-unknown-model", lambda f: ["sweep", write(f, "s.yaml", SWEEP.replace("[baseline]", "[bert]"))],
     r"bert"),
    ("config-missing-dataset", lambda f: ["sweep", write(f, "s.yaml", SWEEP.replace("[synth_regression]", "[m.pkl]"))],
     r"dataset 'm\.pkl' is neither a built-in"),
    ("config-storage-uri", lambda f: ["sweep", write(f, "s.yaml", SWEEP.replace("storage: runs", "storage: s3://b/r"))],
     r"storage 's3://b/r' is a URI"),
    ("config-override-not-key-value", lambda f: ["sweep", write(f, "s.yaml", SWEEP), "budget.trials_per_pair"],
     r"not of the form key=value"),
    ("config-override-breaks-a-bound", lambda f: ["sweep", write(f, "s.yaml", SWEEP), "budget.trials_per_pair=0"],
     r"budget\.trials_per_pair must be >= 1, got 0"),
    ("config-no-seeds", lambda f: ["sweep", write(f, "s.yaml", SWEEP), "budget.seeds_per_trial=0"],
     r"budget\.seeds_per_trial must be >= 1, got 0"),
    ("config-negative-seeds", lambda f: ["sweep", write(f, "s.yaml", SWEEP), "budget.seeds_per_trial=-2"],
     r"budget\.seeds_per_trial must be >= 1, got -2"),
    ("resume-not-a-run-directory", lambda f: ["sweep", "--resume", "elsewhere"], r"elsewhere is not a sweep run directory"),
    ("run-config-missing", lambda f: ["run", "nope.yaml"], r"config file not found: nope\.yaml"),
    ("warm-start-not-a-run-directory", lambda f: ["sweep", write(f, "s.yaml", SWEEP + "search: {warm_start: [old]}\n")],
     r"search\.warm_start: old is not a sweep run directory"),
    ("warm-start-of-another-model", lambda f: ["sweep", write(f, "s.yaml", SWEEP + f"search: {{warm_start: [{tfn_run_dir(f)}]}}\n")],
     r"search\.warm_start: .*tfn-old holds no study of baseline \(its studies: tfn-x\)"),
    ("warm-start-top-k-zero", lambda f: ["sweep", write(f, "s.yaml", SWEEP), "search.warm_start_top_k=0"],
     r"search\.warm_start_top_k must be >= 1"),
    ("config-train-sets-a-sweep-owned-key", lambda f: ["sweep", write(f, "s.yaml", SWEEP + "train: {selection_metric: corr}\n")],
     r"train\.selection_metric is set by the sweep itself"),
    # a model that needs more modalities than the data has: refused before Ray starts
    ("train-too-few-modalities", lambda f: ["train", "--model", "dbr", "--data", text_only_npz(f), "--out", "run"],
     r"model 'dbr' needs at least 2 modalities but dataset /\S+/text\.npz has 1 \(text\)"),
    ("sweep-too-few-modalities", lambda f: text_only_sweep(f, "sweep", "invariant"),
     r"model 'invariant' needs at least 2 modalities but dataset 'synth_regression' \(/\S+/text\.npz\) has 1 \(text\)"),
    ("run-too-few-modalities", lambda f: text_only_sweep(f, "run", "dbr"),
     r"model 'dbr' needs at least 2 modalities but dataset 'synth_regression' \(/\S+/text\.npz\) has 1 \(text\)"),
    # search spaces
    ("space-missing", lambda f: ["sweep", write(f, "s.yaml", SWEEP + "search: {spaces: {baseline: none.yaml}}\n")],
     r"search\.spaces\.baseline: .*none\.yaml does not exist"),
    ("space-unknown-hyperparameter",
     lambda f: space_sweep(f, "learning_rate: {type: log_float, low: 1.0e-4, high: 1.0e-2}\n"),
     r"unknown hyperparameter 'learning_rate'"),
    ("space-empty-range",
     lambda f: space_sweep(f, "lr: {type: float, low: 0.1, high: 0.1}\n"),
     r"low \(0\.1\) must be < high \(0\.1\)"),
    ("space-names-a-sweep-owned-key", lambda f: space_sweep(f, "precision: {type: categorical, choices: [fp32, bf16]}\n"),
     r"space\.yaml: precision: .*sweep-owned and not searchable"),
    ("space-log-range-from-zero",
     lambda f: space_sweep(f, "lr: {type: log_float, low: 0.0, high: 0.1}\n"),
     r"log range needs low > 0"),
    # data files
    ("data-missing", lambda f: ["train", "--model", "baseline", "--data", "nope.pkl", "--out", "run"],
     r"data file not found: nope\.pkl"),
    ("data-unknown-format", lambda f: ["train", "--model", "baseline", "--data", write(f, "d.csv", "a,b\n"), "--out", "run"],
     r"not an \.npz archive, an MMSA pickle"),
    ("data-pickle-without-mmsa-keys", lambda f: ["train", "--model", "baseline", "--data", keyless_pickle(f), "--out", "run"],
     r"lacks the MMSA keys"),
    ("data-nan-features", lambda f: ["train", "--model", "baseline", "--data", poisoned_npz(f), "--out", "run"],
     r"NaN or inf features"),
    ("data-inspect-missing", lambda f: ["data", "inspect", "nope.npz"], r"data file not found: nope\.npz"),
    ("data-synth-unknown-suffix", lambda f: ["data", "synth", "--out", "x.csv"], r"use a \.pkl"),
    # arguments
    ("unknown-command", lambda f: ["fit"], r"invalid choice: 'fit'"),
    ("train-unknown-model", lambda f: ["train", "--model", "bert", "--data", data_pkl(f)],
     r"unknown model 'bert'; registered models: baseline, dbr, fine, invariant, tfn"),
    ("train-unknown-override", lambda f: ["train", "--model", "baseline", "--data", data_pkl(f), "bogus=3"],
     r"unknown key 'bogus'"),
    ("train-out-exists", lambda f: ["train", "--model", "baseline", "--data", data_pkl(f), "--out", "data.pkl"],
     r"output folder data\.pkl already exists"),
    ("train-bf16-on-cpu", lambda f: ["train", "--model", "baseline", "--data", data_pkl(f), "--out", "run",
                                     "precision=bf16"], r"precision bf16 needs a GPU"),
    ("sweep-address-malformed", lambda f: ["sweep", write(f, "s.yaml", SWEEP), "--address", "head-node"],
     r"--address 'head-node' is not auto, HOST:PORT or ray://HOST:PORT"),
    ("leaderboard-unknown-format", lambda f: ["leaderboard", ".", "--format", "xls"], r"invalid choice: 'xls'"),
    ("leaderboard-missing", lambda f: ["leaderboard", "elsewhere", "--format", "md"], r"no leaderboard at elsewhere"),
    ("ensemble-not-a-run-directory", lambda f: ["ensemble", "elsewhere"], r"elsewhere is not a sweep run directory"),
    ("mlflow-not-a-run-directory", lambda f: ["mlflow", "elsewhere"], r"elsewhere is not a sweep run directory"),
    # registry names and prediction inputs
    ("registry-run-dir-without-store", lambda f: ["registry", "--run-dir", "."], r"has no MLflow store"),
    ("predict-without-a-server", lambda f: ["predict", "--model", "models:/msa-baseline-x@champion", "--data",
                                            data_pkl(f), "--out", "p.csv"], r"no tracking server"),
    ("predict-missing-data", lambda f: ["predict", "--model", "models:/msa-baseline-x@champion", "--data", "nope.pkl",
                                        "--out", "p.csv", "--run-dir", "."], r"data file not found: nope\.pkl"),
    ("predict-unknown-split", lambda f: ["predict", "--model", "models:/m@champion", "--data", data_pkl(f),
                                         "--out", "p.csv", "--split", "dev"], r"invalid choice: 'dev'"),
]


@pytest.mark.parametrize("build, message", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(build, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv = build(tmp_path)
    inputs = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("msa: error: "), err
    assert re.search(message, err[0]), err[0]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == inputs, "output left behind"

