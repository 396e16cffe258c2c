"""The text cache: a text encoder's inputs for a dataset, on disk, computed once and read
memory-mapped by every later sweep, trial, `msa train`, resume and ensemble retraining.

An entry is one depth of one tokenization of one dataset: depth 0 holds the token ids, depth k
the hidden states after the encoder's embeddings and first k layers (its frozen prefix). It is
addressed by the SHA-256 of what determines it (`EntryKey`: the dataset's SHA-256, the
tokenizer's digest, ``max_length``, the depth and, for k > 0, the encoder weights' digest), so
two datasets, tokenizers or encoders never share one and nothing has to be invalidated.

Each entry is a folder ``<root>/<key digest>/`` holding, per split, ``<split>.npy`` (token ids as
uint16 when the vocabulary fits, else int32; hidden states as float16 ``(N, L, h)``, two bytes
per number) and ``<split>_lengths.npy``, and ``entry.json`` (the key, shapes and every file's
SHA-256). Writers stream into a hidden folder beside it and rename it into place, so a reader
sees a whole entry or none; an entry whose files do not match their digests is deleted and
computed again, never used.

The root is ``text_encoder.cache_dir`` when a config sets it, else ``$MSA_CACHE_DIR``, else
``$XDG_CACHE_HOME/msa-sweep/text`` (``~/.cache/msa-sweep/text``). `msa cache` lists, sizes and
clears it. Runs in the driver, in the Ray task that computes a sweep's prefixes, in trials (they
open entries) and in `msa train`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from msa.platform.core.errors import MsaError
from msa.platform.data.features import SPLITS, FeatureSet, TextEncoding
from msa.platform.data.text import EncoderInfo, tokenize

ENTRY_FILE = "entry.json"
PREFIX_DTYPE = np.float16  # the hidden states' storage: what a model trained on the cache reads
FORMAT = 1  # bumped when an entry's files change meaning; part of every key


def cache_root(configured: str = "") -> Path:
    """The cache folder: `configured`, else ``$MSA_CACHE_DIR``, else the user's cache directory."""
    if configured:
        return Path(configured).expanduser().resolve()
    if os.environ.get("MSA_CACHE_DIR"):
        return Path(os.environ["MSA_CACHE_DIR"]).expanduser().resolve()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return (base / "msa-sweep" / "text").resolve()


@dataclass(frozen=True)
class EntryKey:
    """What determines an entry's contents."""

    dataset_sha256: str
    tokenizer_sha256: str
    max_length: int
    depth: int
    encoder_sha256: str = ""  # the weights the prefix was computed with ("" for token ids)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps({**dataclasses.asdict(self), "format": FORMAT}, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    """A complete entry on disk (see the module docstring)."""

    folder: Path
    meta: dict

    @property
    def depth(self) -> int:
        return int(self.meta["key"]["depth"])

    def key(self) -> EntryKey:
        return EntryKey(**self.meta["key"])

    @property
    def size_bytes(self) -> int:
        return int(self.meta["bytes"])

    def encoding(self) -> TextEncoding:
        key = self.meta["key"]
        return TextEncoding(tokenizer_sha256=key["tokenizer_sha256"], max_length=key["max_length"],
                            hidden_size=self.meta["hidden_size"], source=self.meta["source"], prefix_layers=key["depth"],
                            encoder_sha256=key["encoder_sha256"])

    def arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per split, the text array (memory-mapped, read-only) and the token counts."""
        out = {}
        for split in SPLITS:
            text = np.load(self.folder / f"{split}.npy", mmap_mode="r")
            lengths = np.load(self.folder / f"{split}_lengths.npy").astype(np.int64)
            if text.dtype.kind in "ui":  # token ids are int64 wherever they are used
                text = np.asarray(text, dtype=np.int64)
            out[split] = (text, lengths)
        return out

    def apply(self, dataset: FeatureSet) -> FeatureSet:
        """`dataset` (the one this entry was made from) with its text replaced by this entry's."""
        if self.meta["key"]["dataset_sha256"] != dataset.fingerprint:
            raise MsaError(f"text cache entry {self.folder} was made from other data than {dataset.source or dataset.name}")
        return dataset.with_text(self.arrays(), self.encoding())

    def verify(self) -> bool:
        """Every file is there and matches its recorded SHA-256."""
        for name, expected in self.meta["files"].items():
            path = self.folder / name
            if not path.is_file() or _sha256_file(path) != expected:
                return False
        return True


def open_entry(folder: str | Path) -> CacheEntry:
    """The entry in `folder`, trusted as it is (a sweep's driver verified it before its trials ran).

    Raises:
        MsaError: no entry there."""
    try:
        return CacheEntry(Path(folder), json.loads((Path(folder) / ENTRY_FILE).read_text()))
    except (OSError, ValueError):
        raise MsaError(f"text cache entry {folder} is missing or unreadable (was the cache cleared during the sweep?)") from None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class TextCache:
    """The cache folder `root` (created on the first write)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def folder(self, key: EntryKey) -> Path:
        return self.root / key.digest()

    def get(self, key: EntryKey, *, verify: bool = True) -> CacheEntry | None:
        """The entry for `key`, or None. With `verify`, an entry whose files do not match their
        digests is deleted (it will be computed again) and None returned."""
        folder = self.folder(key)
        try:
            meta = json.loads((folder / ENTRY_FILE).read_text())
        except (OSError, ValueError):
            return None
        entry = CacheEntry(folder, meta)
        if meta.get("key") != dataclasses.asdict(key) or (verify and not entry.verify()):
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return entry

    def entries(self) -> list[CacheEntry]:
        """Every complete entry, newest first."""
        found = []
        for entry_file in self.root.glob(f"*/{ENTRY_FILE}"):
            try:
                found.append(CacheEntry(entry_file.parent, json.loads(entry_file.read_text())))
            except (OSError, ValueError):
                continue
        return sorted(found, key=lambda e: e.meta.get("created", 0), reverse=True)

    def clear(self) -> tuple[int, int]:
        """Delete every entry (and any half-written one); the number removed and their bytes."""
        entries = self.entries()
        for child in self.root.iterdir() if self.root.is_dir() else []:
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        return len(entries), sum(e.size_bytes for e in entries)

    def writer(self, key: EntryKey, *, hidden_size: int, source: str, dataset: str) -> "EntryWriter":
        self.root.mkdir(parents=True, exist_ok=True)
        return EntryWriter(self, key, hidden_size=hidden_size, source=source, dataset=dataset)


class EntryWriter:
    """Streams one entry's arrays into a hidden folder and publishes it whole (`publish`).

    Arrays are written row block by row block (`append`), so no whole split is ever held in
    memory, and hashed as they are written."""

    def __init__(self, cache: TextCache, key: EntryKey, *, hidden_size: int, source: str, dataset: str):
        self.cache, self.key = cache, key
        self.staging = Path(tempfile.mkdtemp(dir=cache.root, prefix=".partial-"))
        self.meta = {"key": dataclasses.asdict(key), "hidden_size": hidden_size, "source": source, "dataset": dataset,
                     "files": {}, "shapes": {}}
        self._open: dict[str, tuple[BinaryIO, _HashedWrite, int]] = {}  # split -> file, its hash, rows written

    def start(self, split: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        handle = (self.staging / f"{split}.npy").open("wb")
        digest = _HashedWrite(handle)
        np.lib.format.write_array_header_2_0(digest, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                      "fortran_order": False, "shape": tuple(shape)})
        self._open[split] = (handle, digest, 0)
        self.meta["shapes"][split] = list(shape)

    def append(self, split: str, rows: np.ndarray) -> None:
        handle, digest, written = self._open[split]
        digest.write(np.ascontiguousarray(rows).tobytes())
        self._open[split] = (handle, digest, written + len(rows))

    def finish(self, split: str, lengths: np.ndarray) -> None:
        handle, digest, written = self._open.pop(split)
        handle.close()
        if written != self.meta["shapes"][split][0]:
            raise RuntimeError(f"text cache: {written} rows written for split {split}, {self.meta['shapes'][split][0]} declared")
        self.meta["files"][f"{split}.npy"] = digest.hexdigest()
        np.save(self.staging / f"{split}_lengths.npy", lengths.astype(np.int64))
        self.meta["files"][f"{split}_lengths.npy"] = _sha256_file(self.staging / f"{split}_lengths.npy")

    def publish(self) -> CacheEntry:
        """Move the finished entry into place (an entry another process published first wins)."""
        self.meta["bytes"] = sum((self.staging / name).stat().st_size for name in self.meta["files"])
        self.meta["created"] = time.time()
        (self.staging / ENTRY_FILE).write_text(json.dumps(self.meta, indent=1))
        target = self.cache.folder(self.key)
        try:
            self.staging.chmod(0o755)
            os.rename(self.staging, target)
        except OSError:  # published meanwhile by another process
            shutil.rmtree(self.staging, ignore_errors=True)
        return CacheEntry(target, json.loads((target / ENTRY_FILE).read_text()))

    def discard(self) -> None:
        for handle, _, _ in self._open.values():
            handle.close()
        shutil.rmtree(self.staging, ignore_errors=True)


class _HashedWrite:
    """A file handle's `write` that also hashes what it writes."""

    def __init__(self, handle: BinaryIO):
        self.handle, self._digest = handle, hashlib.sha256()

    def write(self, data) -> int:
        self._digest.update(data)
        return self.handle.write(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def ids_dtype(largest_id: int) -> np.dtype:
    """The narrowest dtype that holds token ids up to `largest_id` (two bytes for BERT's and
    RoBERTa's vocabularies)."""
    return np.dtype(np.uint16) if largest_id <= np.iinfo(np.uint16).max else np.dtype(np.int32)


def token_entry(dataset: FeatureSet, encoder: EncoderInfo, max_length: int, cache: TextCache) -> CacheEntry:
    """The entry of `dataset`'s token ids for `encoder`'s tokenizer (tokenized here when missing).

    Raises:
        MsaError: see `tokenize`.
    """
    key = EntryKey(dataset_sha256=dataset.fingerprint, tokenizer_sha256=encoder.tokenizer_sha256,
                   max_length=max_length, depth=0)
    entry = cache.get(key)
    if entry is not None:
        return entry
    tokens = tokenize(dataset, encoder, max_length)
    largest = max(int(split.features["text"].max(initial=0)) for split in tokens.splits.values())
    writer = cache.writer(key, hidden_size=encoder.hidden_size, source=tokens.text_encoding.source, dataset=dataset.name)
    try:
        for name, split in tokens.splits.items():
            ids = split.features["text"]
            writer.start(name, ids.shape, ids_dtype(largest))
            writer.append(name, ids.astype(ids_dtype(largest)))
            writer.finish(name, split.lengths["text"])
        return writer.publish()
    finally:
        writer.discard()
