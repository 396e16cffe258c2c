"""A Hugging Face text encoder trained end to end inside every registered model, through the real
training loop (DeepSpeed, one rank): frozen layers, parameter groups, the frozen-prefix cache
against the uncached path, the checkpoint's encoder files, and one run on real MiniLM weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from msa.models.registry import MODELS, build_model
from msa.platform.core.errors import MsaError
from msa.platform.data.readers import load_dataset, write_npz
from msa.platform.data.synth import synthesize
from msa.platform.data.text import resolve_encoder, tokenize
from msa.platform.training.checkpoint import Checkpoint
from msa.platform.training.config import TextEncoderConfig
from msa.platform.training.loop import train_loop
from msa.platform.training.text_encoder import (
    TextEncoderModel,
    encoder_inputs,
    load_encoder,
    parameter_groups,
    prefix_states,
)

SIZES = {"train": 48, "valid": 16, "test": 16}


@pytest.fixture(scope="module")
def data_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "synth.npz"
    write_npz(synthesize("regression", seed=0, sizes=SIZES), path)
    return path


def train(data, out, encoder, epochs=1, **text_encoder):
    return train_loop({"model": text_encoder.pop("model", "baseline"), "data": str(data), "out": str(out),
                       "epochs": epochs, "batch_size": 16,
                       "text_encoder": {"path": str(encoder), "max_length": 12, **text_encoder}})


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_registered_model_trains_with_an_encoder_and_keeps_its_weights_and_tokenizer(model, data_npz, tiny_bert, tmp_path):
    result = train(data_npz, tmp_path / "run", tiny_bert, model=model)
    checkpoint = Checkpoint(result.out_dir)
    weights = torch.load(checkpoint.verified_weights("test"), weights_only=True)
    assert any(k.startswith("encoder.encoder.layer.1.") for k in weights) and any(k.startswith("model.") for k in weights)
    assert checkpoint.spec.dims["text"] == 32  # the encoder's hidden size
    folder = checkpoint.verified_text_encoder("test")
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    assert checkpoint.text_encoding["source"] == "raw_text" and checkpoint.text_encoding["max_length"] == 12


def test_a_modified_tokenizer_file_is_refused(data_npz, tiny_bert, tmp_path):
    folder = train(data_npz, tmp_path / "run", tiny_bert).out_dir
    (folder / "text_encoder" / "tokenizer.json").write_text("{}")
    with pytest.raises(MsaError, match="tokenizer.json differs from the one metrics.json recorded"):
        Checkpoint(folder).verified_text_encoder("loading")


def test_frozen_layers_get_no_gradient_and_do_not_change(data_npz, tiny_bert, tmp_path):
    result = train(data_npz, tmp_path / "run", tiny_bert, epochs=2, freeze_layers=1, prefix_cache=False)
    trained = torch.load(Checkpoint(result.out_dir).verified_weights("test"), weights_only=True)
    pretrained = load_encoder(tiny_bert).state_dict()
    for name, value in pretrained.items():
        after = trained[f"encoder.{name}"]
        if name.startswith(("embeddings.", "encoder.layer.0.")):
            assert torch.equal(after, value), name
        elif name.startswith("encoder.layer.1."):
            assert not torch.equal(after, value), f"{name} did not train"
    model = TextEncoderModel(load_encoder(tiny_bert), torch.nn.Identity(), 1)
    assert all(not p.requires_grad for p in model.encoder.embeddings.parameters())
    assert all(p.requires_grad for p in model.layers[1].parameters())
    model.train()
    assert not model.encoder.embeddings.training and not model.layers[0].training and model.layers[1].training


def test_finetune_false_freezes_the_whole_encoder(data_npz, tiny_bert, tmp_path):
    result = train(data_npz, tmp_path / "run", tiny_bert, finetune=False)
    trained = torch.load(Checkpoint(result.out_dir).verified_weights("test"), weights_only=True)
    for name, value in load_encoder(tiny_bert).state_dict().items():
        assert torch.equal(trained[f"encoder.{name}"], value), name
    assert Checkpoint(result.out_dir).text_encoding["prefix_layers"] == 2  # its whole output was computed once


def test_each_encoder_layer_gets_its_own_learning_rate(tiny_bert):
    dataset = tokenize(synthesize("regression", seed=0, sizes=SIZES), resolve_encoder(str(tiny_bert)), 12)
    model = TextEncoderModel(load_encoder(tiny_bert), build_model("baseline", dataset.spec), 0)
    config = TextEncoderConfig(path=str(tiny_bert), lr=1e-4, layer_decay=0.5)
    groups = parameter_groups(model, 1e-3, 0.01, config)
    assert [g["lr"] for g in groups] == [1e-3, 1e-4 * 0.25, 1e-4 * 0.5, 1e-4]  # model, embeddings, layer 0, layer 1
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert {id(p) for p in model.encoder.pooler.parameters()}.isdisjoint(in_groups)  # off the path to the model
    frozen = parameter_groups(TextEncoderModel(load_encoder(tiny_bert), build_model("baseline", dataset.spec), 1),
                              1e-3, 0.01, config)
    assert [g["lr"] for g in frozen] == [1e-3, 1e-4]


def test_the_prefix_cache_gives_the_uncached_outputs_exactly(tiny_bert):
    """Eval mode: the model given the cached hidden states predicts what it predicts from the ids."""
    dataset = tokenize(synthesize("regression", seed=0, sizes=SIZES), resolve_encoder(str(tiny_bert)), 12)
    torch.manual_seed(0)
    model = TextEncoderModel(load_encoder(tiny_bert), build_model("fine", dataset.spec), 1).eval()
    split = dataset.splits["test"]
    ids, lengths = split.features["text"], split.lengths["text"]
    others = {m: torch.as_tensor(split.features[m], dtype=torch.float32) for m in ("audio", "vision")}
    all_lengths = {m: torch.as_tensor(n) for m, n in split.lengths.items()}
    with torch.no_grad():
        from_ids = model({"text": torch.as_tensor(ids), **others}, all_lengths).prediction
        cached = prefix_states(model, ids, lengths, [1])[1]
        from_cache = model({"text": torch.as_tensor(cached), **others}, all_lengths).prediction
    assert torch.equal(from_ids, from_cache)


def test_a_seeded_run_on_the_prefix_cache_is_the_uncached_run_up_to_float16_rounding(data_npz, tiny_bert, tmp_path):
    """The cache keeps the frozen layers' output in float16 (2 bytes a number): the run on it
    follows the run through the frozen layers to within that rounding, epoch by epoch."""
    uncached = train(data_npz, tmp_path / "uncached", tiny_bert, epochs=2, model="fine", freeze_layers=1, prefix_cache=False)
    cached = train(data_npz, tmp_path / "cached", tiny_bert, epochs=2, model="fine", freeze_layers=1)
    assert Checkpoint(cached.out_dir).text_encoding["prefix_layers"] == 1
    assert Checkpoint(uncached.out_dir).text_encoding["prefix_layers"] == 0
    for split in ("valid", "test"):
        np.testing.assert_allclose(Checkpoint(cached.out_dir).predictions(split).values,
                                   Checkpoint(uncached.out_dir).predictions(split).values, rtol=0, atol=1e-4)
    np.testing.assert_allclose([r["train_loss"] for r in cached.history], [r["train_loss"] for r in uncached.history],
                               rtol=1e-4)


def test_encoder_inputs_refuse_ids_of_another_tokenization(data_npz, tiny_bert):
    config = TextEncoderConfig(path=str(tiny_bert), max_length=12)
    tokens, _ = encoder_inputs(load_dataset(data_npz), config)
    with pytest.raises(MsaError, match=r"another length \(12\) than text_encoder's \(10\)"):
        encoder_inputs(tokens, TextEncoderConfig(path=str(tiny_bert), max_length=10))


def test_real_minilm_layer_by_layer_reproduces_the_files_text_features(minilm_path, mosi_lite_path):
    """mosi_lite's text features are all-MiniLM-L6-v2's last hidden states (32 tokens, float16):
    tokenizing its transcripts and running the real weights layer by layer gives them back."""
    dataset = load_dataset(mosi_lite_path)
    tokens = tokenize(dataset, resolve_encoder(str(minilm_path)), max_length=32)
    split = tokens.splits["valid"]
    np.testing.assert_array_equal(split.lengths["text"], dataset.splits["valid"].lengths["text"])
    model = TextEncoderModel(load_encoder(minilm_path), torch.nn.Identity(), 6)
    states = prefix_states(model, split.features["text"], split.lengths["text"], [6])[6]
    real = np.arange(32)[None, :, None] < split.lengths["text"][:, None, None]
    np.testing.assert_allclose(states * real, dataset.splits["valid"].features["text"], atol=2e-2, rtol=1e-2)


def test_real_minilm_fine_tunes_fine_above_a_cached_prefix(minilm_path, mosi_lite_path, tmp_path):
    dataset = load_dataset(mosi_lite_path)
    result = train_loop({"model": "fine", "data": str(mosi_lite_path), "out": str(tmp_path / "run"), "epochs": 1,
                         "text_encoder": {"path": str(minilm_path), "max_length": 32, "freeze_layers": 5}}, dataset=dataset)
    assert Checkpoint(result.out_dir).text_encoding["prefix_layers"] == 5
    assert result.valid_metrics["mae"] < 1.4  # the train-mean predictor scores about 1.46 on this file


def test_a_resumed_encoder_run_continues_exactly_from_a_state_without_its_frozen_layers(data_npz, tiny_bert, tmp_path):
    """The resumable state leaves the frozen layers out (they come from the pretrained weights)."""
    state_dir = tmp_path / "state"

    def save_at_epoch_1(record, save_state):
        if record["epoch"] == 1:
            state_dir.mkdir()
            save_state(state_dir)

    config = {"model": "baseline", "data": str(data_npz), "epochs": 3, "patience": 10, "batch_size": 16,
              "text_encoder": {"path": str(tiny_bert), "max_length": 12, "freeze_layers": 1, "prefix_cache": False}}
    full = train_loop({**config, "out": str(tmp_path / "full")}, on_epoch=save_at_epoch_1)
    saved = torch.load(next(state_dir.rglob("mp_rank_00_model_states.pt")), weights_only=False)["module"]
    assert not any(k.startswith(("encoder.embeddings.", "encoder.encoder.layer.0.")) for k in saved)
    assert any(k.startswith("encoder.encoder.layer.1.") for k in saved)
    resumed = train_loop({**config, "out": str(tmp_path / "resumed")}, resume_from=state_dir)
    assert [r["train_loss"] for r in resumed.history[1:]] == [r["train_loss"] for r in full.history[1:]]
    np.testing.assert_array_equal(Checkpoint(resumed.out_dir).predictions("test").values,
                                  Checkpoint(full.out_dir).predictions("test").values)
