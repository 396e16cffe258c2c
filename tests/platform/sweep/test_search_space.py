"""Search spaces (`search_spaces/<model>.yaml`): every registered model's space loads and turns into
Optuna distributions that Optuna itself can sample, and every bad space is refused with an
`MsaError` naming the file and the entry. No Ray, no training: these run in a few seconds."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from msa.models.registry import MODELS
from msa.platform.core.config import build_dataclass
from msa.platform.core.errors import MsaError
from msa.platform.sweep.search_space import NAME_SEPARATOR, PARAM_TYPES, Param, SearchSpace, load_search_space
from msa.platform.training.config import SWEEP_OWNED, TrainConfig

DISTRIBUTION_OF_TYPE = {
    "float": (FloatDistribution, False),
    "log_float": (FloatDistribution, True),
    "int": (IntDistribution, False),
    "log_int": (IntDistribution, True),
}


def write_space(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def optuna_key(param: Param) -> str:
    return param.name.replace(".", NAME_SEPARATOR)


def unflatten(sampled: dict) -> dict:
    """``{"model_config/hidden": 32, "lr": 0.01}`` -> ``{"model_config": {"hidden": 32}, "lr": 0.01}``
    (what Ray's OptunaSearch hands a trial)."""
    nested: dict = {}
    for key, value in sampled.items():
        *parents, leaf = key.split(NAME_SEPARATOR)
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def assert_in_param(param: Param, value) -> None:
    """`value`, sampled by Optuna, lies in the range or choices of `param`."""
    if param.type == "categorical":
        assert value in param.choices, (param.name, value)
    else:
        assert param.low <= value <= param.high, (param.name, value)
        if param.type in ("int", "log_int"):
            assert isinstance(value, int), (param.name, value)


# --- every registered model ------------------------------------------------------------------


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_registered_model_has_a_valid_search_space(model):
    space = load_search_space(model)
    assert isinstance(space, SearchSpace) and space.model == model
    assert Path(space.source).is_file() and Path(space.source).name == f"{model}.yaml"
    assert space.params, f"{model}: empty search space"
    assert all(p.type in PARAM_TYPES for p in space.params)
    names = [p.name for p in space.params]
    assert len(names) == len(set(names))
    assert not set(names) & set(SWEEP_OWNED)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_optuna_space_keys_and_distribution_types(model):
    space = load_search_space(model)
    optuna_space = space.optuna_space()
    searched = [p for p in space.params if p.type != "fixed"]
    assert set(optuna_space) == {optuna_key(p) for p in searched}
    assert not any("." in key for key in optuna_space), "Optuna keys must use '/' for nesting"
    config_fields = {f.name for f in dataclasses.fields(MODELS[model].config_class)}
    for param in searched:
        key = optuna_key(param)
        distribution = optuna_space[key]
        if param.name.startswith("model_config."):
            assert key == f"model_config/{param.name.split('.', 1)[1]}"
            assert key.split("/", 1)[1] in config_fields
        if param.type == "categorical":
            assert isinstance(distribution, CategoricalDistribution)
            assert list(distribution.choices) == list(param.choices)
        else:
            cls, log = DISTRIBUTION_OF_TYPE[param.type]
            assert isinstance(distribution, cls), (key, distribution)
            assert distribution.log is log, key
            assert (distribution.low, distribution.high) == (param.low, param.high)


def test_baseline_space_contents():
    """The baseline file as written: log-uniform lr and weight decay, model_config via '/'."""
    space = load_search_space("baseline")
    optuna_space = space.optuna_space()
    assert set(optuna_space) == {"lr", "weight_decay", "batch_size", "model_config/hidden", "model_config/dropout"}
    assert optuna_space["lr"] == FloatDistribution(1e-4, 5e-3, log=True)
    assert optuna_space["weight_decay"].log is True
    assert optuna_space["model_config/dropout"] == FloatDistribution(0.0, 0.5, log=False)
    assert optuna_space["model_config/hidden"] == CategoricalDistribution([32, 64, 128])
    assert space.fixed_values() == {"grad_clip": 1.0}


def test_fixed_values_is_a_nested_mapping(tmp_path):
    path = write_space(tmp_path, """
lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}
model_config.hidden: {type: int, low: 16, high: 64}
model_config.dropout: {type: fixed, value: 0.2}
grad_clip: {type: fixed, value: 0.5}
""")
    space = load_search_space("baseline", path)
    assert space.fixed_values() == {"model_config": {"dropout": 0.2}, "grad_clip": 0.5}
    assert set(space.optuna_space()) == {"lr", "model_config/hidden"}
    assert space.optuna_space()["model_config/hidden"] == IntDistribution(16, 64)
    assert space.source == str(path)


def test_the_default_point_is_the_models_defaults_under_the_train_section_clipped_into_the_space(tmp_path):
    """A study's first trial: TrainConfig's and the model config's defaults (the sweep's train:
    section over them), each moved into its range; fixed parameters are not in it."""
    path = write_space(tmp_path, """
lr: {type: log_float, low: 1.0e-4, high: 5.0e-3}
weight_decay: {type: log_float, low: 1.0e-3, high: 1.0e-2}
batch_size: {type: categorical, choices: [8, 40, 128]}
patience: {type: int, low: 2, high: 4}
regression_loss: {type: categorical, choices: [mse]}
model_config.hidden: {type: categorical, choices: [32, 64, 128]}
model_config.dropout: {type: float, low: 0.2, high: 0.5}
text_encoder.lr: {type: log_float, low: 1.0e-5, high: 1.0e-4}
text_encoder.freeze_layers: {type: int, low: 1, high: 5}
grad_clip: {type: fixed, value: 0.5}
""")
    space = load_search_space("baseline", path)
    base = TrainConfig(model="baseline", data="d.pkl", patience=3, model_config={"hidden": 128},
                       text_encoder={"path": "enc", "freeze_layers": 9})
    point = space.default_point(build_dataclass(TrainConfig, dataclasses.asdict(base), where="test"))
    assert point == {
        "lr": 1e-3,                              # TrainConfig's default, inside the range
        "weight_decay": 1e-3,                    # its default 1e-4, clipped up to low
        "batch_size": 40,                        # 32 is no choice: the nearest one
        "patience": 3,                           # the train: section's value, not the default 6
        "regression_loss": "mse",                # "l1" is no choice and not a number: the first
        "model_config/hidden": 128,              # the train: section's model_config
        "model_config/dropout": 0.2,             # the model's default 0.1, clipped up to low
        "text_encoder/lr": 5e-5,                 # TextEncoderConfig's default
        "text_encoder/freeze_layers": 5,         # 9 clipped down to high
    }
    assert set(point) == set(space.optuna_space())
    assert all(space.optuna_space()[name]._contains(space.optuna_space()[name].to_internal_repr(value))
               for name, value in point.items())


def test_a_space_of_only_fixed_values_has_an_empty_optuna_space(tmp_path):
    path = write_space(tmp_path, "model_config.dropout: {type: fixed, value: 0.2}\n")
    space = load_search_space("baseline", path)
    assert space.optuna_space() == {}
    assert space.fixed_values() == {"model_config": {"dropout": 0.2}}


def test_every_param_type_is_accepted(tmp_path):
    path = write_space(tmp_path, """
lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}
weight_decay: {type: float, low: 0, high: 0.1}
batch_size: {type: log_int, low: 8, high: 64}
patience: {type: int, low: 2, high: 5}
regression_loss: {type: categorical, choices: [l1, mse]}
grad_clip: {type: fixed, value: 1}
""")
    types = {p.name: p.type for p in load_search_space("baseline", path).params}
    assert sorted(types.values()) == sorted(PARAM_TYPES)


def test_fixed_param_has_no_distribution():
    with pytest.raises(ValueError):
        Param("grad_clip", "fixed", value=1.0).distribution()


def test_unknown_model_is_refused(tmp_path):
    path = write_space(tmp_path, "lr: {type: fixed, value: 0.01}\n")
    with pytest.raises(MsaError, match="unknown model 'gpt'"):
        load_search_space("gpt", path)


# --- bad search spaces -------------------------------------------------------------------------

# (id, YAML text, the entry the message must name, the problem it must name)
BAD_ENTRIES = [
    ("low-equals-high", "lr: {type: float, low: 0.1, high: 0.1}", "lr", r"low \(0\.1\) must be < high \(0\.1\)"),
    ("low-above-high", "model_config.dropout: {type: float, low: 0.5, high: 0.1}", "model_config.dropout",
     r"low \(0\.5\) must be < high \(0\.1\)"),
    ("int-low-above-high", "batch_size: {type: int, low: 64, high: 16}", "batch_size", r"low \(64\) must be < high"),
    ("log-float-low-zero", "lr: {type: log_float, low: 0.0, high: 0.1}", "lr", r"log range needs low > 0, got 0\.0"),
    ("log-float-low-negative", "weight_decay: {type: log_float, low: -1.0, high: 0.1}", "weight_decay",
     r"log range needs low > 0"),
    ("log-int-low-zero", "batch_size: {type: log_int, low: 0, high: 64}", "batch_size", r"log range needs low > 0"),
    ("int-with-float-low", "batch_size: {type: int, low: 16.0, high: 64}", "batch_size",
     r"low and high must be integers, got 16\.0"),
    ("log-int-with-float-high", "batch_size: {type: log_int, low: 16, high: 64.5}", "batch_size",
     r"must be integers, got 64\.5"),
    ("int-with-bool-bound", "patience: {type: int, low: true, high: 4}", "patience", r"must be integers, got True"),
    ("categorical-empty-choices", "batch_size: {type: categorical, choices: []}", "batch_size",
     r"choices must be a non-empty list"),
    ("categorical-choices-not-a-list", "batch_size: {type: categorical, choices: 32}", "batch_size",
     r"choices must be a non-empty list"),
    ("categorical-choices-a-mapping", "batch_size: {type: categorical, choices: {a: 1}}", "batch_size",
     r"choices must be a non-empty list"),
    ("unknown-type", "lr: {type: uniform, low: 0.1, high: 0.2}", "lr", r"unknown type 'uniform'; use one of float"),
    ("missing-type", "lr: {low: 0.1, high: 0.2}", "lr", r"expected a mapping with a 'type'"),
    ("entry-not-a-mapping", "lr: 0.001", "lr", r"expected a mapping with a 'type'"),
    ("float-with-choices", "lr: {type: float, low: 0.1, high: 0.2, choices: [0.1]}", "lr",
     r"type float takes exactly high, low, got choices, high, low"),
    ("float-missing-high", "lr: {type: float, low: 0.1}", "lr", r"type float takes exactly high, low, got low$"),
    ("categorical-with-range", "batch_size: {type: categorical, low: 1, high: 2}", "batch_size",
     r"type categorical takes exactly choices, got high, low"),
    ("fixed-without-value", "grad_clip: {type: fixed}", "grad_clip", r"type fixed takes exactly value, got nothing"),
    ("unknown-train-field", "learning_rate: {type: log_float, low: 1.0e-4, high: 1.0e-2}", "learning_rate",
     r"unknown hyperparameter 'learning_rate' \(fields of TrainConfig"),
    ("unknown-model-config-field", "model_config.width: {type: categorical, choices: [8, 16]}", "model_config.width",
     r"unknown hyperparameter 'width' \(fields of BaselineConfig: dropout, hidden\)"),
    ("other-models-field", "model_config.post_fusion_hidden: {type: categorical, choices: [8]}",
     "model_config.post_fusion_hidden", r"unknown hyperparameter 'post_fusion_hidden' \(fields of BaselineConfig"),
    ("nested-model-config-name", "model_config.hidden.size: {type: fixed, value: 8}", "model_config.hidden.size",
     r"unknown hyperparameter 'hidden\.size'"),
    ("dotted-train-field", "lr.max: {type: fixed, value: 0.1}", "lr.max", r"unknown hyperparameter; use a TrainConfig"),
    ("sweep-owned-epochs", "epochs: {type: int, low: 1, high: 10}", "epochs", r"sweep-owned and not searchable"),
    ("sweep-owned-seed", "seed: {type: categorical, choices: [0, 1]}", "seed", r"sweep-owned and not searchable"),
    ("sweep-owned-model", "model: {type: categorical, choices: [baseline, tfn]}", "model",
     r"sweep-owned and not searchable"),
    ("sweep-owned-data", "data: {type: fixed, value: x.npz}", "data", r"sweep-owned and not searchable"),
    ("whole-model-config", "model_config: {type: fixed, value: {hidden: 8}}", "model_config",
     r"sweep-owned and not searchable"),
    ("int-field-float-range", "model_config.hidden: {type: float, low: 0.5, high: 2.5}", "model_config.hidden",
     r"key 'hidden': expected an integer, got 0\.5"),
    ("int-field-string-choice", "batch_size: {type: categorical, choices: [16, thirty-two]}", "batch_size",
     r"key 'batch_size': expected an integer, got 'thirty-two'"),
    ("float-field-bool-choice", "lr: {type: categorical, choices: [0.01, true]}", "lr",
     r"key 'lr': expected a number, got True"),
    ("literal-field-bad-choice", "regression_loss: {type: categorical, choices: [l1, huber]}", "regression_loss",
     r"'huber' is not one of 'l1', 'mse'"),
    ("fixed-value-wrong-type", "grad_clip: {type: fixed, value: high}", "grad_clip",
     r"key 'grad_clip': expected a number, got 'high'"),
]


@pytest.mark.parametrize("text, entry, problem", [case[1:] for case in BAD_ENTRIES], ids=[c[0] for c in BAD_ENTRIES])
def test_bad_entry_is_refused_naming_file_and_entry(tmp_path, text, entry, problem):
    # A valid entry first: the bad one is found wherever it is.
    path = write_space(tmp_path, "lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}\n" * (entry != "lr") + text + "\n")
    with pytest.raises(MsaError, match=rf"^{re.escape(str(path))}: {re.escape(entry)}: .*{problem}"):
        load_search_space("baseline", path)


# (id, file text, the problem the message must name after the file name)
BAD_FILES = [
    ("empty-file", "", r"the search space is empty"),
    ("only-comments", "# nothing searched yet\n", r"the search space is empty"),
    ("not-a-mapping", "- lr\n- batch_size\n", r"expected a mapping of keys to values, got list"),
    ("a-scalar", "lr\n", r"expected a mapping of keys to values, got str"),
    ("malformed-yaml", "lr: {type: float, low: [0.1\n", r"malformed YAML"),
]


@pytest.mark.parametrize("text, problem", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_file_is_refused_naming_the_file(tmp_path, text, problem):
    path = write_space(tmp_path, text)
    with pytest.raises(MsaError, match=rf"^{re.escape(str(path))}: .*{problem}"):
        load_search_space("baseline", path)


def test_missing_search_space_file_is_refused(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(MsaError, match=rf"no search space for model 'baseline': {re.escape(str(path))} does not exist"):
        load_search_space("baseline", path)
    assert not path.exists()


def test_a_folder_is_not_a_search_space(tmp_path):
    with pytest.raises(MsaError, match="does not exist"):
        load_search_space("baseline", tmp_path)


# Bugs found while writing these tests (not fixed here): each should be an MsaError.
def test_float_range_on_int_field_with_integer_bounds_is_refused(tmp_path):
    path = write_space(tmp_path, "model_config.hidden: {type: float, low: 16, high: 64}\n")
    with pytest.raises(MsaError, match="model_config.hidden"):
        load_search_space("baseline", path)


@pytest.mark.parametrize("text", ["lr: {type: [float], low: 0.1, high: 0.2}\n",
                                  "1: {type: fixed, value: 1}\n"], ids=["list-type", "int-name"])
def test_odd_yaml_shapes_are_msa_errors(tmp_path, text):
    path = write_space(tmp_path, text)
    with pytest.raises(MsaError, match=re.escape(str(path))):
        load_search_space("baseline", path)


# --- with Optuna itself ------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["tpe", "random"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_optuna_samples_lie_in_range_and_build_valid_configs(model, sampler):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_search_space(model)
    searched = {optuna_key(p): p for p in space.params if p.type != "fixed"}
    make_sampler = optuna.samplers.TPESampler if sampler == "tpe" else optuna.samplers.RandomSampler
    study = optuna.create_study(sampler=make_sampler(seed=0))  # in memory
    for i in range(12):
        trial = study.ask(space.optuna_space())
        assert set(trial.params) == set(searched)
        for key, value in trial.params.items():
            assert_in_param(searched[key], value)
        # What a trial receives (sampled values unflattened, plus the fixed ones) builds both configs.
        values = unflatten(trial.params)
        for name, fixed in space.fixed_values().items():
            if isinstance(fixed, dict):
                values.setdefault(name, {}).update(fixed)
            else:
                values[name] = fixed
        model_config = values.pop("model_config", {})
        build_dataclass(TrainConfig, {**values, "model": model}, where="sampled train config")
        build_dataclass(MODELS[model].config_class, model_config, where="sampled model config")
        study.tell(trial, float(i))


def test_optuna_samples_every_param_type(tmp_path):
    path = write_space(tmp_path, """
lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}
weight_decay: {type: float, low: 0.0, high: 0.1}
batch_size: {type: log_int, low: 8, high: 64}
patience: {type: int, low: 2, high: 5}
regression_loss: {type: categorical, choices: [l1, mse]}
model_config.dropout: {type: fixed, value: 0.2}
""")
    space = load_search_space("baseline", path)
    params = {optuna_key(p): p for p in space.params}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        trial = study.ask(space.optuna_space())
        assert set(trial.params) == {"lr", "weight_decay", "batch_size", "patience", "regression_loss"}
        for key, value in trial.params.items():
            assert_in_param(params[key], value)
        study.tell(trial, 0.0)


def test_unquoted_exponent_bounds_are_numbers(tmp_path):
    """YAML 1.1 would read 1e-4 (no dot) as a string; the config loader reads it as a number."""
    path = tmp_path / "baseline.yaml"
    path.write_text("lr: {type: log_float, low: 1e-4, high: 1e-2}\n")
    space = load_search_space("baseline", path)
    assert space.optuna_space()["lr"] == FloatDistribution(1e-4, 1e-2, log=True)
