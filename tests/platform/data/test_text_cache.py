"""The text cache on disk: entries addressed by what made them, two bytes per number, written
whole or not at all, verified before use (a damaged entry is computed again), listed and cleared
by `msa cache`; with the tiny BERT's real tokenizer and layers."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from msa.platform.cli import main
from msa.platform.data.synth import synthesize
from msa.platform.data.text import resolve_encoder, tokenize
from msa.platform.data.text_cache import EntryKey, TextCache, cache_root, token_entry
from msa.platform.training.text_encoder import TextEncoderModel, load_encoder, prefix_entries, prefix_states

SIZES = {"train": 40, "valid": 12, "test": 12}
MAX_LENGTH = 12


@pytest.fixture
def cache(tmp_path) -> TextCache:
    return TextCache(tmp_path / "cache")


@pytest.fixture(scope="module")
def dataset():
    return synthesize("regression", seed=0, sizes=SIZES)


def test_token_ids_are_cached_as_two_byte_integers_and_read_back_as_tokenized(dataset, tiny_bert, cache):
    encoder = resolve_encoder(str(tiny_bert))
    entry = token_entry(dataset, encoder, MAX_LENGTH, cache)
    assert np.load(entry.folder / "train.npy", mmap_mode="r").dtype == np.uint16
    tokens, expected = entry.apply(dataset), tokenize(dataset, encoder, MAX_LENGTH)
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(tokens.splits[split].features["text"], expected.splits[split].features["text"])
        np.testing.assert_array_equal(tokens.splits[split].lengths["text"], expected.splits[split].lengths["text"])
    assert tokens.text_encoding == expected.text_encoding
    assert token_entry(dataset, encoder, MAX_LENGTH, cache).folder == entry.folder  # found, not made again
    assert token_entry(dataset, encoder, MAX_LENGTH + 1, cache).folder != entry.folder  # another length, another key


def test_prefixes_are_float16_memory_mapped_and_match_the_layers(dataset, tiny_bert, cache):
    encoder = resolve_encoder(str(tiny_bert))
    tokens = token_entry(dataset, encoder, MAX_LENGTH, cache)
    entries = prefix_entries(tokens, encoder, [1, 2], cache)
    model = TextEncoderModel(load_encoder(tiny_bert), torch.nn.Identity(), encoder.depth)
    ids = tokens.apply(dataset).splits["valid"]
    exact = prefix_states(model, ids.features["text"], ids.lengths["text"], [1, 2])
    for depth, entry in entries.items():
        array = entry.apply(dataset).splits["valid"].features["text"]
        assert isinstance(array, np.memmap) and array.dtype == np.float16
        assert array.shape == (SIZES["valid"], MAX_LENGTH, encoder.hidden_size)
        np.testing.assert_allclose(array, exact[depth], rtol=1e-3, atol=1e-3)  # float16 rounding only
        numbers = sum(SIZES.values()) * MAX_LENGTH * encoder.hidden_size
        assert sum((entry.folder / f"{s}.npy").stat().st_size for s in SIZES) <= 2 * numbers + 3 * 128  # + .npy headers
    stamps = {k: (e.folder / "train.npy").stat().st_mtime_ns for k, e in entries.items()}
    again = prefix_entries(tokens, encoder, [1, 2], cache)
    assert {k: (e.folder / "train.npy").stat().st_mtime_ns for k, e in again.items()} == stamps


def test_a_damaged_entry_is_never_used_but_computed_again(dataset, tiny_bert, cache):
    encoder = resolve_encoder(str(tiny_bert))
    tokens = token_entry(dataset, encoder, MAX_LENGTH, cache)
    entry = prefix_entries(tokens, encoder, [1], cache)[1]
    good = np.load(entry.folder / "test.npy").copy()
    raw = bytearray((entry.folder / "test.npy").read_bytes())
    raw[-1] ^= 0xFF  # one flipped byte in the last number
    (entry.folder / "test.npy").write_bytes(bytes(raw))
    key = dataclasses.replace(tokens.key(), depth=1, encoder_sha256=encoder.weights_sha256())
    assert cache.get(key) is None and not entry.folder.exists()
    again = prefix_entries(tokens, encoder, [1], cache)[1]
    assert again.verify()
    np.testing.assert_array_equal(np.load(again.folder / "test.npy"), good)


def test_a_half_written_entry_is_invisible_and_cleared(dataset, tiny_bert, cache):
    encoder = resolve_encoder(str(tiny_bert))
    key = EntryKey(dataset_sha256=dataset.fingerprint, tokenizer_sha256=encoder.tokenizer_sha256, max_length=MAX_LENGTH,
                   depth=0)
    writer = cache.writer(key, hidden_size=encoder.hidden_size, source="raw_text", dataset=dataset.name)
    writer.start("train", (SIZES["train"], MAX_LENGTH), np.uint16)  # a writer killed before it published
    assert cache.get(key) is None and cache.entries() == []
    (entry,) = [token_entry(dataset, encoder, MAX_LENGTH, cache)]
    assert cache.entries() == [entry]
    assert cache.clear() == (1, entry.size_bytes)
    assert list(cache.root.iterdir()) == []  # the half-written one too


def test_msa_cache_lists_and_clears(dataset, tiny_bert, cache, capsys):
    encoder = resolve_encoder(str(tiny_bert))
    tokens = token_entry(dataset, encoder, MAX_LENGTH, cache)
    prefix_entries(tokens, encoder, [2], cache)
    assert main(["cache", "list", "--dir", str(cache.root)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].startswith(f"{cache.root}: 2 entries")
    assert any("token ids" in line and "synth_regression" in line for line in listing[1:])
    assert any("prefix after 2 layer(s)" in line and f"max_length {MAX_LENGTH}" in line for line in listing[1:])
    assert main(["cache", "clear", "--dir", str(cache.root)]) == 0
    assert capsys.readouterr().out.startswith("removed 2 entries")
    assert cache.entries() == []


def test_the_cache_folder_is_configured_else_the_environments_else_the_users(tmp_path, monkeypatch):
    assert cache_root(str(tmp_path / "mine")) == tmp_path / "mine"
    monkeypatch.setenv("MSA_CACHE_DIR", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    monkeypatch.delenv("MSA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "msa-sweep" / "text"
