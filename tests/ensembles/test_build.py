"""`msa ensemble`, `msa leaderboard` and the registered ensemble, end to end on real sweeps.

The ensembles of the session's reference sweep (conftest.py: baseline and TFN on the synthetic
regression and 20-class sets, 3 trials per pair, real Ray, DeepSpeed and MLflow) are built once
for the module; each test reads them, the sweep, or a copy of its run directory. The seed-group
tests build on the session's seed sweep; `msa run` runs a whole job of its own."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import mlflow.artifacts
import numpy as np
import pytest
import yaml
from clean_env import check_serves_like_msa_predict
from helpers import sweep_yaml

from msa.ensembles.board import Leaderboard
from msa.ensembles.leaderboard import render
from msa.ensembles.members import DatasetCache, load_member, sweep_candidates
from msa.ensembles.retrain import retrain
from msa.platform.cli import main
from msa.platform.core.metrics import METRIC_MODES, compute_metrics
from msa.platform.data.readers import load_dataset
from msa.platform.tracking.client import ROLE_TAG, TRIAL_TAG
from msa.platform.training.checkpoint import Checkpoint

DATASETS = ("synth_classification", "synth_regression")
FAST = ["--seeds", "2", "--folds", "3", "--bootstrap", "200"]


@pytest.fixture(scope="module")
def run_dir(reference_sweep) -> Path:
    return reference_sweep.run_dir


@pytest.fixture(scope="module")
def board(run_dir) -> dict:
    assert main(["ensemble", str(run_dir), "--top-k", "2", *FAST]) == 0
    return json.loads((run_dir / "ensembles" / "leaderboard.json").read_text())


def test_the_built_leaderboard_json_reads_back_as_a_record_that_writes_it_identically(board, run_dir):
    """`msa ensemble` wrote leaderboard.json from the typed record; read back, the record gives the
    same file, key by key and byte for byte (and so every format rendered from it)."""
    path = run_dir / "ensembles" / "leaderboard.json"
    record = Leaderboard.read(path)
    assert record.to_json().encode("utf-8") == path.read_bytes()
    assert [section.dataset for section in record.datasets] == [entry["dataset"] for entry in board["datasets"]]
    folder = run_dir / "ensembles"
    for fmt, suffix in (("csv", ".csv"), ("md", ".md"), ("html", ".html"), ("latex", ".tex")):
        assert render(record, fmt).encode("utf-8") == (folder / f"leaderboard{suffix}").read_bytes(), fmt  # CSV: \r\n


def entry_of(board: dict, dataset: str) -> dict:
    return next(e for e in board["datasets"] if e["dataset"] == dataset)


def stored_test_predictions(run_dir: Path, member: str, task: str) -> np.ndarray:
    model, trial = member.split("/")
    (folder,) = (run_dir / "trials").glob(f"{model}-*/{trial}")
    return Checkpoint(folder).predictions("test").values


def test_two_files_named_alike_are_two_sections_and_two_registered_ensembles(board, reference_sweep, mlflow_client):
    """The reference sweep's two data files are both ``unaligned_50.pkl`` (as MMSA ships CMU-MOSI
    and CMU-MOSEI), named by its mapping: one leaderboard section and one registered ensemble each."""
    assert {path.name for path in reference_sweep.data.values()} == {"unaligned_50.pkl"}
    assert sorted(entry["dataset"] for entry in board["datasets"]) == sorted(reference_sweep.data) == sorted(DATASETS)
    for name in reference_sweep.data:
        assert mlflow_client.get_registered_model(f"msa-ensemble-{name}").latest_versions


@pytest.mark.parametrize("dataset", DATASETS)
def test_leaderboard_ranks_members_baselines_and_every_learner_on_valid(board, run_dir, reference_sweep, dataset):
    entry = entry_of(board, dataset)
    metric, task = entry["selection_metric"], entry["task"]
    rows = entry["rows"]
    kinds = [r["kind"] for r in rows]
    assert kinds.count("member") == 3 and kinds.count("best single") == 1 and kinds.count("seed ensemble") == 1
    learners = {"regression": {"mean", "nnls", "ridge", "caruana"}, "classification": {"mean", "nnls", "logistic", "caruana"}}
    assert {r["name"] for r in rows if r["kind"] == "ensemble"} == learners[task]
    # Ranked by the valid selection metric, in its direction.
    valid = [r["valid"][metric] for r in rows]
    assert valid == sorted(valid, reverse=METRIC_MODES[metric] == "max")
    # The best single model is the member with the best valid score, and its difference is 0.
    singles = [r for r in rows if r["stack_level"] == 0]
    best = next(r for r in rows if r["kind"] == "best single")
    assert best["valid"][metric] == (min if METRIC_MODES[metric] == "min" else max)(r["valid"][metric] for r in singles)
    assert best["name"] == entry["best_single"]
    assert best["test_diff"][metric] == {"diff": 0.0, "low": 0.0, "high": 0.0}
    # Members' test numbers are those of their own stored predictions.
    dataset_file = load_dataset(reference_sweep.data[dataset])
    truth = dataset_file.splits["test"].labels
    for row in singles:
        expected = compute_metrics(entry["metric_suite"], stored_test_predictions(run_dir, row["name"], task), truth)
        assert row["test"][metric] == pytest.approx(expected[metric])
        assert row["test_diff"][metric]["diff"] == pytest.approx(expected[metric] - best["test"][metric])
    for row in rows:
        diff = row["test_diff"][metric]
        assert diff["low"] <= diff["diff"] <= diff["high"]
        weights = [m["weight"] for m in row["members"]]
        if row["name"] in ("mean", "caruana") or row["stack_level"] == 0 or row["kind"] == "seed ensemble":
            assert sum(weights) == pytest.approx(1.0, abs=1e-6)
        if row["name"] in ("nnls", "caruana"):
            assert min(weights) >= 0
    # Every stacked row says how its valid number was obtained: cross-fitted, not in-sample.
    assert all("cross-fitted" in r["valid_estimate"] for r in rows if r["kind"] == "ensemble")


def test_ensembles_are_logged_and_the_best_is_registered(board, run_dir, mlflow_client):
    experiment = mlflow_client.get_experiment_by_name(run_dir.name)
    runs = mlflow_client.search_runs([experiment.experiment_id])
    # this build's runs (the other tests of this module log builds of their own into the experiment)
    built = {r["mlflow_run_id"] for entry in board["datasets"] for r in entry["rows"] if r["stack_level"] == 1}
    children = [r for r in runs if r.data.tags[ROLE_TAG] == "ensemble" and r.info.run_id in built]
    (parent,) = [r for r in runs if r.data.tags[ROLE_TAG] == "ensembles"
                 and r.info.run_id == children[0].data.tags["mlflow.parentRunId"]]
    assert {c.data.tags["dataset"] for c in children} == set(DATASETS)
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    files = {a.path for a in mlflow_client.list_artifacts(parent.info.run_id, "leaderboard")}
    assert files == {f"leaderboard/leaderboard.{ext}" for ext in ("csv", "md", "json", "html", "tex")}
    trial_ids = {r.info.run_id: r.data.tags[TRIAL_TAG] for r in runs if r.data.tags[ROLE_TAG] == "trial"}
    for entry in board["datasets"]:
        child = next(c for c in children if c.data.tags["dataset"] == entry["dataset"])
        stacked = [r for r in entry["rows"] if r["stack_level"] == 1]
        # Rows are ranked: the first stacked ensemble is the best on (cross-fitted) valid; the
        # seed ensemble is a baseline, never registered.
        best = next(r for r in stacked if r["kind"] == "ensemble")
        assert best["registered"] == f"msa-ensemble-{entry['dataset']}@1"
        assert all(r["registered"] == "" for r in stacked if r is not best)
        assert all(r["mlflow_run_id"] == child.info.run_id for r in stacked)
        key = best["name"].replace("(", "_").replace(")", "_")
        metric = entry["selection_metric"]
        assert child.data.metrics[f"{key}.test_{metric}"] == pytest.approx(best["test"][metric])
        version = mlflow_client.get_model_version_by_alias(f"msa-ensemble-{entry['dataset']}", "champion")
        assert version.run_id == child.info.run_id and version.tags["ensemble"] == best["name"]
        for row in entry["rows"]:
            if row["stack_level"] == 0:  # members link to their own trial runs
                assert trial_ids[row["mlflow_run_id"]] == row["name"].split("/")[1]


def test_msa_predict_with_the_registered_ensemble_reproduces_its_test_score(board, run_dir, reference_sweep, mlflow_client,
                                                                          tmp_path):
    dataset = "synth_classification"
    entry = entry_of(board, dataset)
    out = tmp_path / "predictions.csv"
    assert main(["predict", "--model", f"models:/msa-ensemble-{dataset}@champion", "--tracking-uri", mlflow_client.tracking_uri,
                 "--data", str(reference_sweep.data[dataset]), "--out", str(out)]) == 0
    _, labels, probabilities = read_predictions_with_split(out)
    best = next(r for r in entry["rows"] if r["kind"] == "ensemble")
    metrics = compute_metrics("classification", probabilities, labels)
    assert metrics == pytest.approx(best["test"])
    assert np.allclose(probabilities.sum(axis=1), 1.0)


def test_the_registered_ensemble_loads_and_serves_where_msa_is_not_installed(board, run_dir, reference_sweep, mlflow_client,
                                                                             clean_env, tmp_path):
    """The classification ensemble (baseline and TFN members): its pyfunc carries the members'
    code and the combiner, not the meta-learners' fitting (SciPy) nor the ensemble build."""
    model_uri = "models:/msa-ensemble-synth_classification@champion"
    uri = mlflow_client.tracking_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(tmp_path / "model")))
    carried = {str(path.relative_to(folder / "code")) for path in (folder / "code").rglob("*.py")}
    assert {"msa/ensembles/ensemble_model.py", "msa/ensembles/combiner.py", "msa/models/tfn.py",
            "msa/models/baseline.py"} <= carried
    assert not carried & {"msa/ensembles/meta_learners.py", "msa/ensembles/build.py", "msa/ensembles/registration.py"}
    assert "msa-sweep" not in (folder / "requirements.txt").read_text()
    probabilities = check_serves_like_msa_predict(clean_env, model_uri, uri, reference_sweep.data["synth_classification"],
                                                  cwd=tmp_path, serve=True)
    assert probabilities.shape[1] == 20 and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def read_predictions_with_split(path: Path):
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = [c for c in rows[0] if c.startswith("prob_")]
    return ([r["id"] for r in rows], np.asarray([int(r["label"]) for r in rows]),
            np.asarray([[float(r[c]) for c in columns] for r in rows]))


@pytest.mark.parametrize("fmt", ["csv", "md", "json", "html", "latex"])
def test_msa_leaderboard_exports_each_format(board, run_dir, tmp_path, fmt):
    out = tmp_path / f"board.{fmt}"
    assert main(["leaderboard", str(run_dir), "--format", fmt, "--out", str(out)]) == 0
    text = out.read_text()
    assert text == (run_dir / "ensembles" / f"leaderboard.{'tex' if fmt == 'latex' else fmt}").read_text()
    for entry in board["datasets"]:
        assert entry["dataset"] in text


def test_out_of_fold_protocol_stacks_on_retrained_fold_models(board, run_dir, reference_sweep, tmp_path):
    out = tmp_path / "oof"
    assert main(["ensemble", str(run_dir), "--top-k", "1", "--protocol", "oof", "--learners", "mean,nnls",
                 "--out", str(out), "--no-register", *FAST, "--folds", "2"]) == 0
    oof_board = json.loads((out / "leaderboard.json").read_text())
    assert oof_board["protocol"] == "oof"
    entry = entry_of(oof_board, "synth_regression")
    combiners = json.loads((out / "synth_regression" / "combiners.json").read_text())
    mean = next(r for r in entry["rows"] if r["name"] == "mean")
    assert "out-of-fold" in mean["valid_estimate"]
    # Each member column is its 2 fold models (trained on train+valid folds), averaged on test.
    groups = [[Path(p) for p in group] for group in combiners["mean"]["groups"]]
    assert [len(g) for g in groups] == [2, 2]
    columns = [np.mean([Checkpoint(f).predictions("test").values for f in g], axis=0) for g in groups]
    truth = load_dataset(reference_sweep.data["synth_regression"]).splits["test"].labels
    assert compute_metrics("mosi", np.mean(columns, axis=0), truth)["mae"] == pytest.approx(mean["test"]["mae"])
    fold_config = yaml.safe_load((groups[0][0] / "config.yaml").read_text())
    trial_folder = next(p for p in sweep_candidates(run_dir) if p.name == entry["best_single"]).folder
    assert fold_config["epochs"] == json.loads((trial_folder / "metrics.json").read_text())["best_epoch"]
    assert (out / "synth_regression" / "seeds").is_dir()


def test_members_can_come_from_an_mlflow_experiment(board, run_dir, mlflow_client, tmp_path):
    out = tmp_path / "from-mlflow"
    assert main(["ensemble", "--experiment", run_dir.name, "--tracking-uri", mlflow_client.tracking_uri, "--out", str(out),
                 "--top-k", "2", "--learners", "mean", "--no-register", *FAST]) == 0
    from_mlflow = json.loads((out / "leaderboard.json").read_text())
    for dataset in DATASETS:
        ours, theirs = entry_of(from_mlflow, dataset), entry_of(board, dataset)
        singles = {r["name"]: r["test"] for r in theirs["rows"] if r["stack_level"] == 0}
        assert {r["name"]: r["test"] for r in ours["rows"] if r["stack_level"] == 0} == singles
        assert next(r for r in ours["rows"] if r["name"] == "mean")["test"] == \
            next(r for r in theirs["rows"] if r["name"] == "mean")["test"]
    assert len(list((out / "checkpoints").glob("*/*/model.pt"))) == 12  # every finished trial's checkpoint


def test_a_retrain_already_done_is_reused(run_dir, reference_sweep, tmp_path):
    (candidate,) = [c for c in sweep_candidates(run_dir) if c.dataset == "synth_regression"][:1]
    dataset = load_dataset(reference_sweep.data["synth_regression"], name="synth_regression")
    out = retrain(candidate.folder, dataset, tmp_path / "again", seed=7)
    stamp = (out / "model.pt").stat().st_mtime_ns
    assert retrain(candidate.folder, dataset, tmp_path / "again", seed=7) == out
    assert (out / "model.pt").stat().st_mtime_ns == stamp
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 7


def test_missing_predictions_are_recomputed_from_the_checkpoint(run_dir, tmp_path):
    candidate = sweep_candidates(run_dir)[0]
    stored = load_member(candidate, DatasetCache())
    copy = tmp_path / "trial"
    shutil.copytree(candidate.folder, copy)
    (copy / "predictions_test.csv").unlink()
    from dataclasses import replace

    recomputed = load_member(replace(candidate, folder=copy), DatasetCache())
    assert recomputed.recomputed and not stored.recomputed
    assert recomputed.ids["test"] == stored.ids["test"]
    assert np.allclose(recomputed.predictions["test"], stored.predictions["test"], atol=1e-6)


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    # Named apart from the original: an ensemble of the copy logs to the session's server under its name.
    copy = tmp_path / f"copy-{run_dir.name}"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("ensembles", "ray", "train"))
    # Trial configs point at the original's data file; that is fine for these checks.
    return copy


def first_trial(run_copy: Path, model: str = "baseline", dataset: str = "synth_regression") -> Path:
    return sorted((run_copy / "trials" / f"{model}-{dataset}").iterdir())[0]


def assert_refused(args: list[str], run_copy: Path, capsys, message: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (run_copy / "ensembles").exists()  # nothing written


def test_a_modified_checkpoint_is_refused(run_copy, capsys):
    trial = first_trial(run_copy)
    with (trial / "model.pt").open("ab") as handle:
        handle.write(b"tampered")
    assert_refused(["ensemble", str(run_copy), "--top-k", "3"], run_copy, capsys,  # every trial a member
                   f"member baseline/{trial.name}: SHA-256 of")


def test_members_with_different_clips_are_refused(run_copy, capsys):
    trial = first_trial(run_copy, "tfn")
    lines = (trial / "predictions_valid.csv").read_text().splitlines()
    (trial / "predictions_valid.csv").write_text("\n".join(lines[:-1]) + "\n")
    assert_refused(["ensemble", str(run_copy), "--top-k", "3"], run_copy, capsys,  # every trial a member
                   f"member tfn/{trial.name} predicts other valid clips")


def test_top_k_above_the_finished_trials_is_refused(run_copy, capsys):
    assert_refused(["ensemble", str(run_copy), "--top-k", "4"], run_copy, capsys,
                   "top_k 4 is larger than the 3 finished trials of model baseline")


def test_a_run_without_finished_trials_is_refused(run_copy, capsys):
    shutil.rmtree(run_copy / "optuna")
    (run_copy / "optuna").mkdir()
    assert_refused(["ensemble", str(run_copy)], run_copy, capsys, "no finished trial with a checkpoint")


def test_bad_ensemble_options_are_refused(run_copy, capsys):
    assert_refused(["ensemble", str(run_copy), "--folds", "1"], run_copy, capsys, "ensemble.folds must be >= 2")
    assert_refused(["ensemble", str(run_copy), "--learners", "median"], run_copy, capsys, "unknown meta-learner 'median'")
    assert_refused(["ensemble", str(run_copy.parent / "nowhere")], run_copy, capsys, "not a sweep run directory")


def test_msa_run_sweeps_ensembles_and_exports_the_leaderboard(ray_runtime, tmp_path, capsys, monkeypatch):
    """One job: one MLflow server for both halves, the dataset loaded once (the seed ensemble
    retrains on the sweep's copy: nothing reads a dataset file again), one leaderboard rendering;
    `msa predict --run-dir` then serves the run's own store and predicts what the board scored.
    (Its own MLflow server, not the session's: the job's server is what it tests.)"""
    from msa.ensembles import members

    reads = []
    monkeypatch.setattr(members, "load_dataset", lambda *a, **k: reads.append(a) or load_dataset(*a, **k))
    config = sweep_yaml(tmp_path, name="pipeline", budget={"trials_per_pair": 2}, search={"seed": 1},
                        resources={"max_concurrent_trials": 2},
                        ensemble={"top_k": 2, "learners": ["nnls", "caruana"], "folds": 2, "seeds": 2, "bootstrap": 100})
    export = tmp_path / "export"
    assert main(["run", str(config), "--export", str(export)]) == 0
    printed = capsys.readouterr().out
    (run_dir,) = (tmp_path / "sweeps").glob("pipeline-*")
    board = json.loads((export / "leaderboard.json").read_text())
    assert board == json.loads((run_dir / "ensembles" / "leaderboard.json").read_text())
    assert {p.name for p in export.iterdir()} == {f"leaderboard.{ext}" for ext in ("csv", "md", "json", "html", "tex")}
    (entry,) = board["datasets"]
    assert {r["name"] for r in entry["rows"] if r["kind"] == "ensemble"} == {"nnls", "caruana"}  # the config's learners
    assert "[synth_regression] ranked by valid mae" in printed and "msa-ensemble-synth_regression@1" in printed
    assert (run_dir / "mlflow" / "server.log").read_text().count("Uvicorn running on") == 1
    assert reads == []
    for ext in ("csv", "md", "json", "html", "tex"):
        assert (export / f"leaderboard.{ext}").read_bytes() == (run_dir / "ensembles" / f"leaderboard.{ext}").read_bytes()
    out = tmp_path / "predictions.csv"
    assert main(["predict", "--model", "models:/msa-ensemble-synth_regression@champion", "--run-dir", str(run_dir),
                 "--data", str(run_dir / "data" / "synth_regression.pkl"), "--split", "test", "--out", str(out)]) == 0
    with out.open(newline="") as handle:
        predicted = list(csv.DictReader(handle))
    registered = next(r for r in entry["rows"] if r["registered"])
    assert compute_metrics("mosi", np.asarray([float(r["prediction"]) for r in predicted]),
                           np.asarray([float(r["label"]) for r in predicted])) == pytest.approx(registered["test"])


def test_an_ensemble_after_a_partial_sweep_uses_only_finished_trials_with_verified_checkpoints(run_copy):
    """As a stopped sweep leaves it: a trial still RUNNING in its study (its folder holds the best
    epoch it had reached) and a FAILED one are left out; the finished trials are ensembled."""
    import sqlite3

    unfinished = {"baseline": (first_trial(run_copy), "RUNNING"), "tfn": (first_trial(run_copy, "tfn"), "FAIL")}
    for model, (folder, state) in unfinished.items():
        with sqlite3.connect(run_copy / "optuna" / f"{model}-synth_regression.db") as db:
            changed = db.execute("UPDATE trials SET state = ?, datetime_complete = NULL WHERE trial_id IN (SELECT trial_id "
                                 "FROM trial_user_attributes WHERE key = 'ray_trial_id' AND value_json = ?)",
                                 (state, json.dumps(folder.name))).rowcount
        assert changed == 1
    assert main(["ensemble", str(run_copy), "--top-k", "2", "--no-register", *FAST]) == 0  # the 2 finished of 3
    board = json.loads((run_copy / "ensembles" / "leaderboard.json").read_text())
    members = {r["name"] for r in entry_of(board, "synth_regression")["rows"] if r["stack_level"] == 0}
    finished = {f"{model}/{p.name}" for model in unfinished for p in (run_copy / "trials" / f"{model}-synth_regression").iterdir()
                if p != unfinished[model][0]}
    assert members == finished


def test_seed_groups_are_members_shown_as_mean_and_sd_and_the_seed_ensemble_adds_seeds(seed_sweep, mlflow_client,
                                                                                       tmp_path):
    """The session's seed sweep (3 trials of 2 seeds each, some stopped by ASHA, every group
    retried once after a seed raised): every trial is one member whose column is its seeds' mean
    prediction, whose row is the seeds' mean ± sd, ranked on its seed-mean valid score; the seed
    ensemble is the best config's 2 seeds plus the retrained ones (without the sweep's injected
    fault); the out-of-fold protocol retrains every seed; the registered ensemble predicts what
    the board scored."""
    run_dir, data = seed_sweep.run_dir, seed_sweep.data["seeded"]
    assert main(["ensemble", str(run_dir), "--top-k", "2", "--learners", "mean,nnls", *FAST]) == 0
    (entry,) = json.loads((run_dir / "ensembles" / "leaderboard.json").read_text())["datasets"]
    truth = load_dataset(data).splits["test"].labels
    singles = [r for r in entry["rows"] if r["stack_level"] == 0]
    assert len(singles) == 2
    for row in singles:
        (folder,) = (run_dir / "trials").glob(f"baseline-*/{row['name'].split('/')[1]}")
        seeds = [Checkpoint(folder / name) for name in ("seed-3", "seed-4")]
        assert row["seeds"]["count"] == 2
        assert row["valid"]["mae"] == pytest.approx(np.mean([c.metrics["valid"]["mae"] for c in seeds]))
        assert row["test"]["mae"] == pytest.approx(np.mean([c.metrics["test"]["mae"] for c in seeds]))
        assert row["seeds"]["test_sd"]["mae"] == pytest.approx(np.std([c.metrics["test"]["mae"] for c in seeds], ddof=1))
    seed_row = next(r for r in entry["rows"] if r["kind"] == "seed ensemble")
    assert seed_row["name"] == "seed ensemble (3 seeds)" and len(seed_row["members"]) == 3
    assert seed_row["seeds"] is None
    combiners = json.loads((run_dir / "ensembles" / "seeded" / "combiners.json").read_text())
    assert [len(group) for group in combiners["mean"]["groups"]] == [2, 2]  # each member: its two seeds
    columns = [np.mean([Checkpoint(f).predictions("test").values for f in group], axis=0)
               for group in combiners["mean"]["groups"]]
    mean = next(r for r in entry["rows"] if r["name"] == "mean")
    assert compute_metrics("mosi", np.mean(columns, axis=0), truth)["mae"] == pytest.approx(mean["test"]["mae"])
    out = tmp_path / "predictions.csv"
    assert main(["predict", "--model", "models:/msa-ensemble-seeded@champion", "--tracking-uri",
                 mlflow_client.tracking_uri, "--data", str(data), "--out", str(out)]) == 0
    best = next(r for r in entry["rows"] if r["kind"] == "ensemble")
    with out.open(newline="") as handle:
        predicted = [r for r in csv.DictReader(handle) if r["split"] == "test"]
    assert compute_metrics("mosi", np.asarray([float(r["prediction"]) for r in predicted]),
                           np.asarray([float(r["label"]) for r in predicted]))["mae"] == pytest.approx(best["test"]["mae"])

    oof = tmp_path / "oof"
    assert main(["ensemble", str(run_dir), "--top-k", "1", "--protocol", "oof", "--learners", "mean",
                 "--out", str(oof), "--no-register", *FAST]) == 0
    combiners = json.loads((oof / "seeded" / "combiners.json").read_text())
    assert [len(group) for group in combiners["mean"]["groups"]] == [2 * 3]  # 2 seeds x 3 folds
