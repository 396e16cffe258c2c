"""A sweep's text-encoder inputs: what each dataset's trials read, from the text cache
(`msa.platform.data.text_cache`).

The sweep's `train:` section fixes the encoder and ``max_length`` (they decide the token ids);
its search space may vary ``text_encoder.freeze_layers``, ``finetune`` and ``prefix_cache``, so
the driver enumerates the prefix depths their values can give (`TextPlan`, checked before Ray
starts and shown by ``--dry-run``). Once Ray runs, each dataset's token ids are read from the cache
or tokenized into it by the driver, and the missing depths are computed into it by one Ray task
per dataset on the driver's node, which takes that node's GPU when it has one (`materialize`).
The driver never holds a depth in memory.

Trials get `DatasetInputs`: the dataset (token ids in place of its text) once in the object store,
and per depth the entry folder, which they open memory-mapped, so every trial on a node shares one
copy in the page cache. On a joined cluster the entries also go to the object store, one at a
time, and only a trial on a node that does not see the folder pulls them from there.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from msa.platform.core.config import build_dataclass
from msa.platform.core.errors import MsaError
from msa.platform.data.features import FeatureSet
from msa.platform.data.text import EncoderInfo, check_text, resolve_encoder
from msa.platform.data.text_cache import ENTRY_FILE, CacheEntry, EntryKey, TextCache, cache_root, open_entry, token_entry
from msa.platform.sweep.search_space import SearchSpace
from msa.platform.training.config import TextEncoderConfig, TrainConfig
from msa.platform.training.text_encoder import cached_layers, check_depth, prefix_entries

SEARCHED_DEPTH_KEYS = ("freeze_layers", "finetune", "prefix_cache")
ID_BYTES = 2  # token ids are cached as uint16 for vocabularies up to 65,536 (int32 above)
HIDDEN_BYTES = 2  # float16


@dataclass(frozen=True)
class DatasetInputs:
    """What a trial reads for one dataset (see the module docstring)."""

    base: list  # [ObjectRef] of the FeatureSet (a list, so Ray hands the reference over)
    encoder_depth: int = 0  # the encoder's layers (0: no encoder)
    prefixes: dict[int, str] = field(default_factory=dict)  # depth -> its entry folder
    shipped: dict[int, list] = field(default_factory=dict)  # depth -> [ObjectRef] of (arrays, encoding), clusters only

    def load(self, train_config: TrainConfig) -> FeatureSet:
        """The dataset as a trial of `train_config` reads it (in the trial's process)."""
        dataset = ray.get(self.base[0])
        if self.encoder_depth == 0:
            return dataset
        depth = cached_layers(train_config.text_encoder, self.encoder_depth)
        if depth == 0:
            return dataset
        folder = Path(self.prefixes[depth])
        if (folder / ENTRY_FILE).is_file() or depth not in self.shipped:
            return open_entry(folder).apply(dataset)
        arrays, encoding = ray.get(self.shipped[depth][0])
        return dataset.with_text(arrays, encoding)


@dataclass(frozen=True)
class PlannedEntry:
    """One cache entry a sweep reads: whether it is there, and its size (estimated when not)."""

    dataset: str
    depth: int
    key: EntryKey
    cached: bool
    size_bytes: int


@dataclass(frozen=True)
class TextPlan:
    """The sweep's encoder, cache and every prefix depth (> 0) its trials can read."""

    encoder: EncoderInfo
    base: TextEncoderConfig
    cache: TextCache
    depths: tuple[int, ...]
    weights_sha256: str

    def entries(self, dataset: FeatureSet) -> list[PlannedEntry]:
        """`dataset`'s entries, token ids first; looked up without verifying their digests."""
        tokens = EntryKey(dataset_sha256=dataset.fingerprint, tokenizer_sha256=self.encoder.tokenizer_sha256,
                          max_length=self.base.max_length, depth=0)
        keys = [tokens] + [dataclasses.replace(tokens, depth=k, encoder_sha256=self.weights_sha256) for k in self.depths]
        clips = sum(len(split) for split in dataset.splits.values())
        planned = []
        for key in keys:
            entry = self.cache.get(key, verify=False)
            estimate = clips * self.base.max_length * (ID_BYTES if key.depth == 0 else HIDDEN_BYTES * self.encoder.hidden_size)
            planned.append(PlannedEntry(dataset.name, key.depth, key, entry is not None,
                                        entry.size_bytes if entry is not None else estimate))
        return planned


def plan_text(train: dict[str, Any], spaces: list[SearchSpace], datasets: dict[str, FeatureSet]) -> TextPlan | None:
    """The sweep's `TextPlan` (None without an encoder), every dataset checked to have text the
    encoder can read.

    Raises:
        MsaError: see `resolve_encoder`, `possible_depths` and `check_text`."""
    base = build_dataclass(TextEncoderConfig, train.get("text_encoder", {}), where="train: text_encoder")
    if not base.path:
        return None
    encoder = resolve_encoder(base.path)
    for dataset in datasets.values():
        check_text(dataset, encoder)
    depths = tuple(sorted(possible_depths(base, spaces, encoder) - {0}))
    return TextPlan(encoder=encoder, base=base, cache=TextCache(cache_root(base.cache_dir)), depths=depths,
                    weights_sha256=encoder.weights_sha256() if depths else "")


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


def materialize(plan: TextPlan | None, datasets: dict[str, FeatureSet], *, ship: bool, remote: bool) -> dict[str, DatasetInputs]:
    """Every dataset's `DatasetInputs`, its cache entries found or made first (Ray must run).
    `ship`: also put each prefix entry in the object store (a joined cluster); `remote`: compute
    missing prefixes in a Ray task on this node (to take its GPU), else in this process (saving
    a worker's start: the computation streams to disk either way)."""
    if plan is None:
        return {name: DatasetInputs([ray.put(dataset)]) for name, dataset in datasets.items()}
    inputs = {}
    for name, dataset in datasets.items():
        started = time.time()
        tokens = token_entry(dataset, plan.encoder, plan.base.max_length, plan.cache)
        _report(name, tokens, started, "token ids")
        prefixes: dict[int, CacheEntry] = {}
        if plan.depths:
            # (unverified here: a damaged entry is found and computed again by `prefix_entries`)
            missing = [k for k in plan.depths if plan.cache.get(
                dataclasses.replace(tokens.key(), depth=k, encoder_sha256=plan.weights_sha256), verify=False) is None]
            started = time.time()
            prefixes = ray.get(_prefix_task().remote(tokens, plan.encoder, list(plan.depths), plan.cache)) \
                if missing and remote else prefix_entries(tokens, plan.encoder, list(plan.depths), plan.cache)
            for k, entry in prefixes.items():
                _report(name, entry, started, f"depth {k}")
        shipped = {}
        for k, entry in prefixes.items() if ship else ():
            shipped[k] = [ray.put((_in_memory(entry.arrays()), entry.encoding()))]  # one depth in memory at a time
        inputs[name] = DatasetInputs([ray.put(tokens.apply(dataset))], plan.encoder.depth,
                                     {k: str(entry.folder) for k, entry in prefixes.items()}, shipped)
    return inputs


def _report(dataset: str, entry: CacheEntry, started: float, what: str) -> None:
    """One console line per entry: found (made before `started`, a wall-clock time) or computed."""
    how = "cache hit" if entry.meta["created"] < started else f"computed in {time.time() - started:.1f} s"
    print(f"[text cache] {dataset} {what}: {how} ({entry.size_bytes / 2**20:.1f} MiB, {entry.folder})", flush=True)


def _in_memory(arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {split: (np.array(text), lengths) for split, (text, lengths) in arrays.items()}


def driver_node_has_gpu() -> bool:
    """Whether the node the driver runs on has a GPU (for the prefix task to take)."""
    return _this_node()["Resources"].get("GPU", 0) >= 1


def _this_node() -> dict:
    """The Ray node this process runs on."""
    node_id = ray.get_runtime_context().get_node_id()
    return next(n for n in ray.nodes() if n["NodeID"] == node_id)


def _prefix_task():
    """The Ray task that computes missing depths: on the driver's node (its cache folder), with
    that node's GPU when it has one. It asks for one CPU, so that it never waits for a busy
    node, and uses a thread per CPU of the node (no trial runs before it ends)."""
    node = _this_node()
    return ray.remote(_prefixes_on_node).options(
        num_cpus=1, num_gpus=1 if node["Resources"].get("GPU", 0) >= 1 else 0, max_retries=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))


def _prefixes_on_node(tokens: CacheEntry, encoder: EncoderInfo, depths: list[int], cache: TextCache) -> dict[int, CacheEntry]:
    torch.set_num_threads(max(1, int(_this_node()["Resources"].get("CPU", 1))))
    return prefix_entries(tokens, encoder, depths, cache)
