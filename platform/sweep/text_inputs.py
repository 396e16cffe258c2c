"""A sweep's text-encoder inputs: each dataset tokenized once, and the frozen prefix of every
depth a trial can freeze computed once, all in the driver, before any trial starts.

The sweep's `train:` section fixes the encoder and ``max_length`` (they decide the token ids);
its search space may vary ``text_encoder.freeze_layers``, ``finetune`` and ``prefix_cache``, so
the driver enumerates the prefix depths their values can give and computes them in one pass
through the encoder. Trials get their dataset from Ray's object store by depth (`DatasetRefs`):
token ids (depth 0) or the hidden states after the frozen layers. Each depth of a dataset costs
``clips x max_length x hidden x 4`` bytes of object store.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from msa.platform.core.config import build_dataclass
from msa.platform.core.errors import MsaError
from msa.platform.data.features import FeatureSet
from msa.platform.data.text import EncoderInfo, resolve_encoder, tokenize
from msa.platform.sweep.search_space import SearchSpace
from msa.platform.training.config import TextEncoderConfig
from msa.platform.training.text_encoder import cached_layers, check_depth, with_prefix

SEARCHED_DEPTH_KEYS = ("freeze_layers", "finetune", "prefix_cache")


@dataclass(frozen=True)
class DatasetRefs:
    """A dataset in the object store, per prefix depth (0: no encoder, or token ids)."""

    refs: dict[int, Any]  # depth -> [ObjectRef] (a list so Ray hands the reference over)
    encoder_depth: int = 0

    def for_trial(self, train_config: dict[str, Any]) -> list:
        """The reference a trial of `train_config` reads."""
        if self.encoder_depth == 0:
            return self.refs[0]
        encoder = build_dataclass(TextEncoderConfig, train_config.get("text_encoder", {}), where="trial text_encoder")
        return self.refs[cached_layers(encoder, self.encoder_depth)]


def sweep_encoder(train: dict[str, Any]) -> tuple[TextEncoderConfig, EncoderInfo] | None:
    """The encoder the sweep's `train:` section names, resolved (None without one)."""
    encoder = build_dataclass(TextEncoderConfig, train.get("text_encoder", {}), where="train: text_encoder")
    return (encoder, resolve_encoder(encoder.path)) if encoder.path else None


def possible_depths(base: TextEncoderConfig, spaces: list[SearchSpace], encoder: EncoderInfo) -> set[int]:
    """Every prefix depth a trial can need, from the `train:` section and the search spaces.

    Raises:
        MsaError: a ``freeze_layers`` (fixed or searched) beyond the encoder's depth."""
    depths = set()
    for space in spaces:
        values = {key: [getattr(base, key)] for key in SEARCHED_DEPTH_KEYS}
        for param in space.params:
            head, _, key = param.name.partition(".")
            if head == "text_encoder" and key in values:
                values[key] = param.values()
        try:
            check_depth(TextEncoderConfig(path=base.path, freeze_layers=max(values["freeze_layers"])), encoder)
        except MsaError as exc:
            raise MsaError(f"{space.source}: {exc}") from None
        for combination in itertools.product(*values.values()):
            variant = build_dataclass(TextEncoderConfig, {"path": base.path, **dict(zip(values, combination))},
                                      where=f"{space.source}: text_encoder")
            depths.add(cached_layers(variant, encoder.depth))
    return depths


def text_inputs(dataset: FeatureSet, base: TextEncoderConfig, encoder: EncoderInfo, depths: set[int]) -> dict[int, FeatureSet]:
    """`dataset` tokenized, and with the prefix of each depth in `depths` (0 is the token ids)."""
    tokens = tokenize(dataset, encoder, base.max_length)
    out = {0: tokens}
    cached = sorted(depths - {0})
    if cached:
        out.update(with_prefix(tokens, encoder, cached))
    return out


def sweep_inputs(train: dict[str, Any], datasets: dict[str, FeatureSet],
                 spaces: list[SearchSpace]) -> tuple[dict[str, dict[int, FeatureSet]], int]:
    """Per dataset, what its trials read, by prefix depth; and the encoder's depth (0 without
    an encoder: each dataset is then its own depth 0).

    Raises:
        MsaError: see `resolve_encoder`, `possible_depths` and `tokenize`."""
    resolved = sweep_encoder(train)
    if resolved is None:
        return {name: {0: dataset} for name, dataset in datasets.items()}, 0
    base, encoder = resolved
    depths = possible_depths(base, spaces, encoder)
    return {name: text_inputs(dataset, base, encoder, depths) for name, dataset in datasets.items()}, encoder.depth
