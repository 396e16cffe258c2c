"""Search spaces: `search_spaces/<model>.yaml` loaded, validated and turned into Optuna
distributions.

Each entry names a hyperparameter: a `TrainConfig` field (``lr``), a field of the model's config
(``model_config.hidden``) or of the text encoder's (``text_encoder.lr``), and gives its type and
range:

    lr: {type: log_float, low: 1.0e-4, high: 5.0e-3}
    model_config.hidden: {type: categorical, choices: [32, 64, 128]}
    grad_clip: {type: fixed, value: 1.0}

Validation: the name exists in the config it targets, ``low < high``, log ranges are positive,
choices are non-empty, and every value is of the field's type. The fields a sweep sets itself
(`msa.platform.training.config.SWEEP_OWNED`: model, data, out, seed, seeds, epochs, selection_metric,
zero_stage, precision) cannot be searched or fixed here, nor can ``text_encoder.path`` and
``text_encoder.max_length`` (they decide the token ids, made once per dataset by the driver).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from msa.models.registry import build_model_config, get_entry
from msa.platform.core.config import build_dataclass, load_yaml_mapping
from msa.platform.core.errors import MsaError
from msa.platform.training.config import SWEEP_OWNED, TextEncoderConfig, TrainConfig

# Text-encoder keys that decide the token ids, made once per dataset by the sweep's driver.
TOKENIZATION_KEYS = ("path", "max_length")
PARAM_TYPES = ("float", "log_float", "int", "log_int", "categorical", "fixed")
# Optuna parameter names use "/" so that Ray's OptunaSearch unflattens them into nested configs.
NAME_SEPARATOR = "/"


@dataclass(frozen=True)
class Param:
    """One searched (or fixed) hyperparameter.

    Args:
        name: ``lr`` or ``model_config.hidden``.
        type: one of float, log_float, int, log_int, categorical, fixed.
        low, high: the range for float/int types.
        choices: the options for categorical.
        value: the constant for fixed.
    """

    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple[Any, ...] = ()
    value: Any = None

    def distribution(self) -> BaseDistribution:
        if self.type in ("float", "log_float"):
            return FloatDistribution(float(self.low), float(self.high), log=self.type == "log_float")
        if self.type in ("int", "log_int"):
            return IntDistribution(int(self.low), int(self.high), log=self.type == "log_int")
        if self.type == "categorical":
            return CategoricalDistribution(list(self.choices))
        raise ValueError(f"{self.name} is fixed and has no distribution")

    def values(self) -> list[Any]:
        """Every value an integer, categorical or fixed parameter can take."""
        if self.type in ("int", "log_int"):
            return list(range(int(self.low), int(self.high) + 1))
        return self.sample_values()

    def clipped(self, value: Any) -> Any:
        """`value` moved into this parameter's space: a number clipped into [low, high] (rounded
        for integer types; None, a field without a default number, becomes low); for a
        categorical, the value itself if it is a choice, else the numerically nearest choice,
        else the first."""
        if self.type in ("float", "log_float"):
            return min(max(float(self.low if value is None else value), float(self.low)), float(self.high))
        if self.type in ("int", "log_int"):
            return min(max(int(round(self.low if value is None else value)), int(self.low)), int(self.high))
        if self.type == "categorical":
            if value in self.choices:
                return value
            numeric = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in (value, *self.choices))
            return min(self.choices, key=lambda choice: abs(choice - value)) if numeric else self.choices[0]
        raise ValueError(f"{self.name} is fixed and has no range")

    def sample_values(self) -> list[Any]:
        """Values that span the parameter, used to type-check it against its config field."""
        if self.type == "fixed":
            return [self.value]
        if self.type == "categorical":
            return list(self.choices)
        if self.type in ("float", "log_float"):  # Optuna samples floats between the bounds
            return [float(self.low), float(self.high)]
        return [self.low, self.high]


@dataclass(frozen=True)
class SearchSpace:
    """A model's validated search space."""

    model: str
    params: tuple[Param, ...]
    source: str

    def optuna_space(self) -> dict[str, BaseDistribution]:
        """Searched parameters as Optuna distributions, keyed ``lr`` / ``model_config/hidden``."""
        return {
            p.name.replace(".", NAME_SEPARATOR): p.distribution() for p in self.params if p.type != "fixed"
        }

    def default_point(self, base: TrainConfig) -> dict[str, Any]:
        """A study's first trial: each searched parameter at its value in `base` (the model's own
        defaults, its config dataclass holding the papers' settings, under the sweep's `train:`
        section), clipped into the space (`Param.clipped`); keyed as `optuna_space` keys them."""
        model_config = build_model_config(self.model, base.model_config, where="model_config")
        point = {}
        for p in self.params:
            if p.type == "fixed":
                continue
            head, _, field_name = p.name.partition(".")
            owner = {"model_config": model_config, "text_encoder": base.text_encoder}.get(head) if field_name else base
            point[p.name.replace(".", NAME_SEPARATOR)] = p.clipped(getattr(owner, field_name or head))
        return point

    def fixed_values(self) -> dict[str, Any]:
        """Fixed parameters as a nested mapping of train-config overrides."""
        fixed: dict[str, Any] = {}
        for p in self.params:
            if p.type == "fixed":
                *parents, leaf = p.name.split(".")
                node = fixed
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = p.value
        return fixed


def search_space_path(model: str) -> Path:
    """Where the search space of `model` lives (installed with the package)."""
    return Path(str(resources.files("msa.search_spaces") / f"{model}.yaml"))


def load_search_space(model: str, path: str | Path | None = None) -> SearchSpace:
    """Load and validate the search space of `model` (from `path`, default its packaged YAML).

    Raises:
        MsaError: naming the file and the entry for every problem listed in the module docstring.
    """
    entry = get_entry(model)
    path = Path(path) if path is not None else search_space_path(model)
    if not path.is_file():
        raise MsaError(f"no search space for model {model!r}: {path} does not exist")
    raw = load_yaml_mapping(path)
    if not raw:
        raise MsaError(f"{path}: the search space is empty")
    params = tuple(_parse_param(name, spec, f"{path}: {name}") for name, spec in raw.items())
    for param in params:
        _check_against_configs(param, entry.config_class, f"{path}: {param.name}")
    return SearchSpace(model=model, params=params, source=str(path))


def _parse_param(name: Any, spec: Any, where: str) -> Param:
    if not isinstance(name, str):
        raise MsaError(f"{where}: a hyperparameter name must be a string, got {name!r}")
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise MsaError(f"{where}: expected a mapping with a 'type' ({', '.join(PARAM_TYPES)})")
    kind = spec["type"]
    keys = {"float": {"low", "high"}, "log_float": {"low", "high"}, "int": {"low", "high"},
            "log_int": {"low", "high"}, "categorical": {"choices"}, "fixed": {"value"}}.get(kind)
    if keys is None:
        raise MsaError(f"{where}: unknown type {kind!r}; use one of {', '.join(PARAM_TYPES)}")
    given = set(spec) - {"type"}
    if given != keys:
        raise MsaError(f"{where}: type {kind} takes exactly {', '.join(sorted(keys))}, got {', '.join(sorted(given)) or 'nothing'}")
    if kind == "categorical":
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise MsaError(f"{where}: choices must be a non-empty list")
        return Param(name, kind, choices=tuple(choices))
    if kind == "fixed":
        return Param(name, kind, value=spec["value"])
    low, high = spec["low"], spec["high"]
    numeric = (int,) if kind in ("int", "log_int") else (int, float)
    for bound in (low, high):
        if isinstance(bound, bool) or not isinstance(bound, numeric):
            raise MsaError(f"{where}: low and high must be {'integers' if numeric == (int,) else 'numbers'}, got {bound!r}")
    if not low < high:
        raise MsaError(f"{where}: low ({low}) must be < high ({high})")
    if kind.startswith("log") and low <= 0:
        raise MsaError(f"{where}: a log range needs low > 0, got {low}")
    return Param(name, kind, low=low, high=high)


def _check_against_configs(param: Param, model_config_class: type, where: str) -> None:
    """The name must be a field of the config it targets, and every value of that field's type."""
    head, _, field_name = param.name.partition(".")
    if head == "model_config" and field_name:
        target, key = model_config_class, field_name
    elif head == "text_encoder" and field_name:
        if field_name in TOKENIZATION_KEYS:
            raise MsaError(f"{where}: text_encoder.{field_name} decides the token ids, which the sweep computes once "
                           f"per dataset: set it in the sweep's train: section, not in a search space")
        target, key = TextEncoderConfig, field_name
    elif not field_name and head not in (*SWEEP_OWNED, "model_config", "text_encoder"):
        target, key = TrainConfig, head
    else:
        raise MsaError(
            f"{where}: unknown hyperparameter; use a TrainConfig field, model_config.<field> or "
            f"text_encoder.<field> (sweep-owned and not searchable: {', '.join(SWEEP_OWNED)})"
        )
    names = {f.name for f in dataclasses.fields(target)}
    if key not in names:
        raise MsaError(f"{where}: unknown hyperparameter {key!r} (fields of {target.__name__}: {', '.join(sorted(names))})")
    for value in param.sample_values():
        build_dataclass(target, {key: value}, where=where)
