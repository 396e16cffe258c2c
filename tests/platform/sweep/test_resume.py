"""`--resume`: `resume_config` accepts only the config a run started with (naming the first
differing key), refuses a folder that is not a run directory, and refuses one made by msa-sweep
0.1.0 (run-directory layout 1). Ray is never started."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from msa.platform.cli import main
from msa.platform.core.config import to_plain
from msa.platform.core.errors import MsaError
from msa.platform.core.run_dir import RunDir
from msa.platform.sweep.config import (
    BudgetConfig,
    load_sweep_config,
)
from msa.platform.sweep.resume import resume_config


def write_config(folder: Path, text: str, name: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def run_cli(argv: list[str], capsys) -> tuple[int, list[str], str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err.splitlines(), captured.out


def demo_trials(demo_path: Path) -> int:
    """The demo's trials per pair; the resume tests override it with other values."""
    return load_sweep_config(demo_path).budget.trials_per_pair


def started_run(tmp_path: Path, config_path: Path, overrides: list[str] | None = None) -> Path:
    """A run directory as `run_sweep` leaves it: the validated config's plain form in sweep.yaml."""
    run_dir = tmp_path / "demo-20250101-000000"
    run_dir.mkdir()
    config = load_sweep_config(config_path, overrides)
    (run_dir / "sweep.yaml").write_text(yaml.safe_dump(to_plain(config), sort_keys=False))
    RunDir(run_dir).write_layout("test")
    return run_dir


def test_resume_without_a_config_returns_the_started_one(tmp_path, demo_path):
    run_dir = started_run(tmp_path, demo_path)
    config = resume_config(run_dir, None, [])
    assert config == load_sweep_config(demo_path)
    assert isinstance(config.budget, BudgetConfig)


def test_resume_started_with_overrides_returns_them(tmp_path, demo_path):
    trials = demo_trials(demo_path) + 2
    run_dir = started_run(tmp_path, demo_path, [f"budget.trials_per_pair={trials}"])
    assert resume_config(run_dir, None, []).budget.trials_per_pair == trials


@pytest.mark.parametrize("agreeing_override", [False, True], ids=["as-is", "agreeing-override"])
def test_resume_with_the_same_config_is_accepted(tmp_path, demo_path, agreeing_override):
    overrides = [f"budget.trials_per_pair={demo_trials(demo_path)}"] if agreeing_override else []
    run_dir = started_run(tmp_path, demo_path)
    assert resume_config(run_dir, str(demo_path), overrides) == load_sweep_config(demo_path)


def test_resume_with_a_different_config_file_names_the_key(tmp_path, demo_path):
    run_dir = started_run(tmp_path, demo_path)
    trials = demo_trials(demo_path)
    other = write_config(tmp_path, demo_path.read_text().replace(f"trials_per_pair: {trials}", f"trials_per_pair: {trials + 2}"),
                         "other.yaml")
    with pytest.raises(MsaError, match=rf"differs .*\(budget\.trials_per_pair: started with {trials}, given {trials + 2}\)"):
        resume_config(run_dir, str(other), [])


def test_resume_with_a_changing_override_names_the_key(tmp_path, demo_path):
    run_dir = started_run(tmp_path, demo_path)
    with pytest.raises(MsaError, match=r"search\.sampler: started with 'tpe', given 'random'"):
        resume_config(run_dir, str(demo_path), ["search.sampler=random"])


def test_resume_with_only_a_changing_override_is_refused(tmp_path, demo_path):
    run_dir = started_run(tmp_path, demo_path)
    with pytest.raises(MsaError, match=rf"the config differs from the one {re.escape(str(run_dir))} started with"):
        resume_config(run_dir, None, [f"budget.trials_per_pair={demo_trials(demo_path) + 2}"])


def test_resume_with_only_a_changing_override_names_the_key(tmp_path, demo_path):
    run_dir = started_run(tmp_path, demo_path)
    with pytest.raises(MsaError, match=r"budget\.trials_per_pair"):
        resume_config(run_dir, None, [f"budget.trials_per_pair={demo_trials(demo_path) + 2}"])


def test_resume_with_only_an_agreeing_override_is_accepted(tmp_path, demo_path):
    run_dir = started_run(tmp_path, demo_path)
    agreeing = [f"budget.trials_per_pair={demo_trials(demo_path)}"]
    assert resume_config(run_dir, None, agreeing) == load_sweep_config(demo_path)


def test_resume_of_a_tampered_sweep_yaml_names_it(tmp_path, demo_path):
    run_dir = started_run(tmp_path, demo_path)
    started = run_dir / "sweep.yaml"
    started.write_text(started.read_text() + "bogus: 1\n")
    with pytest.raises(MsaError, match=rf"^{re.escape(str(started))}: unknown key 'bogus'"):
        resume_config(run_dir, None, [])


def test_resume_of_a_folder_without_sweep_yaml(tmp_path):
    with pytest.raises(MsaError, match=r"is not a sweep run directory \(no sweep\.yaml\); cannot resume it"):
        resume_config(tmp_path, None, [])
    assert tree(tmp_path) == set()


@pytest.mark.parametrize("target", ["empty-folder", "missing-folder"])
def test_cli_resume_of_a_folder_without_sweep_yaml(tmp_path, monkeypatch, capsys, target):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    if target == "empty-folder":
        run_dir.mkdir()
    before = tree(tmp_path)
    code, err, out = run_cli(["sweep", "--resume", str(run_dir)], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("msa: error: "), err
    assert f"{run_dir.resolve()} is not a sweep run directory (no sweep.yaml)" in err[0]
    assert out == "" and tree(tmp_path) == before


def test_cli_resume_of_tmp_path_itself(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err, _ = run_cli(["sweep", "--resume", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and "is not a sweep run directory" in err[0], err
    assert tree(tmp_path) == set()


def test_cli_resume_with_a_different_config_is_one_line(tmp_path, monkeypatch, capsys, demo_path):
    run_dir = started_run(tmp_path, demo_path)
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    trials = demo_trials(demo_path)
    code, err, _ = run_cli(["sweep", "--resume", str(run_dir), str(demo_path), f"budget.trials_per_pair={trials + 2}"],
                           capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("msa: error: "), err
    assert f"budget.trials_per_pair: started with {trials}, given {trials + 2}" in err[0]
    assert tree(tmp_path) == before


def test_resume_of_a_run_directory_made_by_0_1_0_is_refused_naming_the_version(tmp_path, demo_path, capsys):
    """A run directory without layout.json was made before the platform's layers: its saved Tune
    state pickles module paths this version does not have, so it is refused in one line."""
    run_dir = started_run(tmp_path, demo_path)
    RunDir(run_dir).layout_file.unlink()
    before = tree(tmp_path)
    code, err, _ = run_cli(["sweep", "--resume", str(run_dir)], capsys)
    assert code == 2 and len(err) == 1
    assert "made by msa-sweep 0.1.0" in err[0] and "layout 1" in err[0]
    assert tree(tmp_path) == before


def test_resume_of_a_run_directory_with_one_tune_run_per_pair_is_refused_naming_the_version(tmp_path, demo_path, capsys):
    """Layout 2 kept one Tune experiment per pair (``ray/<pair>/``), run one after another;
    this version restores one experiment for the whole matrix, so such a folder is refused."""
    run_dir = started_run(tmp_path, demo_path)
    RunDir(run_dir).layout_file.write_text(json.dumps({"layout": 2, "msa_sweep": "0.2.0"}) + "\n")
    before = tree(tmp_path)
    code, err, _ = run_cli(["sweep", "--resume", str(run_dir)], capsys)
    assert code == 2 and len(err) == 1
    assert "made by msa-sweep 0.2.0" in err[0] and "layout 2" in err[0] and "resume it with msa-sweep 0.2.0" in err[0]
    assert tree(tmp_path) == before
