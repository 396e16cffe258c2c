"""One name per dataset, the same everywhere: the MMSA case (CMU-MOSI and CMU-MOSEI both shipped
as ``unaligned_50.pkl``) refused before anything starts unless a mapping names them, and, named,
two of everything (the session's reference sweep is that case); ``--dry-run``'s plan; a resume
of a run directory whose studies another naming made, refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import mmsa_named_alike, sweep_config, sweep_yaml, synth_data

from msa.platform.cli import main
from msa.platform.core.config import to_plain
from msa.platform.core.errors import MsaError
from msa.platform.core.files import sha256_path
from msa.platform.core.run_dir import LAYOUT_FILE
from msa.platform.sweep.driver import SweepSession
from msa.platform.training.checkpoint import Checkpoint


def test_two_files_of_one_name_are_refused_naming_both_and_the_fix(tmp_path, capsys):
    paths = [str(p) for p in mmsa_named_alike(tmp_path / "data").values()]
    with pytest.raises(MsaError) as refused:
        SweepSession(sweep_config(tmp_path, datasets=paths, models=["baseline", "tfn"]))
    message = str(refused.value)
    assert f"datasets {paths[0]} and {paths[1]} are both named 'unaligned_50'" in message
    assert "give each its own name with a mapping, e.g. datasets: {unaligned_50_a: " in message
    assert main(["sweep", "--dry-run", str(sweep_yaml(tmp_path, datasets=paths))]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "are both named 'unaligned_50'" in error
    assert not (tmp_path / "sweeps").exists()


def test_a_dry_run_prints_the_plan_and_writes_nothing(tmp_path, tiny_bert, capsys):
    data = mmsa_named_alike(tmp_path / "data")
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"lr": {"type": "log_float", "low": 1e-3, "high": 1e-2},
                                     "text_encoder.freeze_layers": {"type": "categorical", "choices": [1, 2]}}))
    config = sweep_yaml(tmp_path, datasets={"mosi": str(data["synth_regression"]), "mosei": str(data["synth_classification"])},
                        models=["baseline", "tfn"], budget={"trials_per_pair": 5, "max_epochs": 7},
                        search={"spaces": {"baseline": str(space), "tfn": str(space)}},
                        train={"text_encoder": {"path": str(tiny_bert), "max_length": 12}})
    before = sorted(Path(tmp_path).rglob("*"))
    assert main(["sweep", "--dry-run", str(config)]) == 0
    plan = capsys.readouterr().out
    assert sorted(Path(tmp_path).rglob("*")) == before  # no run directory, no cache entry
    for pair, metric in (("baseline-mosi", "mae (min)"), ("tfn-mosi", "mae (min)"), ("baseline-mosei", "acc (max)"),
                         ("tfn-mosei", "acc (max)")):
        assert f"study optuna/{pair}.db  5 trials  valid {metric}" in plan
    assert "mosi" in plan and str(data["synth_regression"]) in plan and "at most 7 epochs a trial" in plan
    assert "1 worker(s) of 1 CPU (inline" in plan
    entries = [line for line in plan.splitlines() if "compute" in line]
    assert len(entries) == 6  # per dataset: token ids, and the prefixes after 1 and 2 layers
    assert sum("prefix after 2 layer(s)" in line for line in entries) == 2
    assert "driver memory  about" in plan


def test_a_resume_whose_studies_another_naming_made_is_refused(tmp_path):
    """A run directory whose study names are not this version's (an npz named after its file
    stem before its recorded name counted) would restart every study silently: refused instead."""
    data = synth_data(tmp_path, "file_stem", suffix=".npz")
    config = sweep_config(tmp_path, datasets={"recorded": str(data)})
    run_dir = tmp_path / "old-run"
    (run_dir / "optuna").mkdir(parents=True)
    (run_dir / "sweep.yaml").write_text(yaml.safe_dump(to_plain(config)))
    (run_dir / LAYOUT_FILE).write_text(json.dumps({"layout": 3, "msa_sweep": "0.4.2"}))
    (run_dir / "optuna" / "baseline-file_stem.db").touch()
    with pytest.raises(MsaError, match=r"its studies \(baseline-file_stem\) are not this version's \(baseline-recorded\).*"
                                       r"made by msa-sweep 0\.4\.2"):
        SweepSession(config, resume_dir=run_dir)


def test_named_datasets_give_two_studies_registered_models_and_checkpoints(reference_sweep, mlflow_client):
    """The reference sweep reads two MMSA pickles named alike, named synth_regression and
    synth_classification by its mapping: each name is its studies', checkpoints', MLflow tags'
    and registered models', with its own file's SHA-256."""
    run_dir = reference_sweep.run_dir
    assert sorted(db.stem for db in (run_dir / "optuna").glob("*.db")) == [
        "baseline-synth_classification", "baseline-synth_regression", "tfn-synth_classification", "tfn-synth_regression"]
    for name, path in reference_sweep.data.items():
        assert path.name == "unaligned_50.pkl"
        for model in ("baseline", "tfn"):
            folders = list((run_dir / "trials" / f"{model}-{name}").iterdir())
            assert folders and {Checkpoint(f).metrics["dataset"] for f in folders} == {name}
            assert {Checkpoint(f).metrics["dataset_fingerprint"] for f in folders} == {sha256_path(path)}
            version = mlflow_client.get_registered_model(f"msa-{model}-{name}").latest_versions[0]
            tags = mlflow_client.get_run(version.run_id).data.tags
            assert (tags["dataset"], tags["dataset_fingerprint"]) == (name, sha256_path(path))
