"""The invariant model's own parts (the shared suite covers its contract): gradient reversal, CMD,
the sequential variation regularizer, the gate, the query fallback, the switches, and its losses
reaching the training history."""
from __future__ import annotations

import csv

import pytest
import torch

from msa.models.invariant import InvariantConfig, InvariantModel, central_moment_discrepancy, sequential_variation
from msa.models.layers import length_mask
from msa.platform.core.errors import MsaError
from msa.platform.core.spec import DataSpec

DIMS = {"text": 12, "audio": 5, "vision": 7}


def spec(modalities=("text", "audio", "vision"), lengths=None, task="regression") -> DataSpec:
    lengths = lengths or {m: 6 for m in modalities}
    return DataSpec(dims={m: DIMS[m] for m in modalities}, max_lengths={m: lengths[m] for m in modalities},
                    task=task, num_classes=20 if task == "classification" else 0)


def batch(data_spec: DataSpec, size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    features, lengths = {}, {}
    for m, d in data_spec.dims.items():
        t = data_spec.max_lengths[m]
        lengths[m] = torch.randint(1, t + 1, (size,), generator=generator)
        features[m] = torch.randn(size, t, d, generator=generator) * length_mask(lengths[m], t).unsqueeze(-1)
    return features, lengths, torch.rand(size, generator=generator) * 6 - 3


def test_gradient_reversal_flips_the_gradient_reaching_the_shared_encoder():
    torch.manual_seed(0)
    model = InvariantModel(spec(), InvariantConfig(d=16, heads=2, grl_strength=0.5, dropout=0.0)).train()
    features, lengths, labels = batch(model.spec, 8)

    def adversarial_gradients() -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        model(features, lengths, labels).aux_losses["adv"].backward()
        return model.shared[0].weight.grad.clone(), model.discriminator[0].weight.grad.clone()

    reversed_shared, reversed_discriminator = adversarial_gradients()
    model.reverse = torch.nn.Identity()
    plain_shared, plain_discriminator = adversarial_gradients()
    assert plain_shared.abs().sum() > 0
    torch.testing.assert_close(reversed_shared, -0.5 * plain_shared)
    # The discriminator itself is trained on the plain gradient.
    torch.testing.assert_close(reversed_discriminator, plain_discriminator)


def test_cmd_is_zero_for_identical_inputs_and_grows_with_a_mean_shift():
    torch.manual_seed(0)
    x = torch.rand(64, 16) * 0.5
    assert central_moment_discrepancy(x, x.clone()).item() == pytest.approx(0.0, abs=1e-7)
    shifted = [central_moment_discrepancy(x, x + shift).item() for shift in (0.05, 0.1, 0.2, 0.4)]
    assert all(a < b for a, b in zip(shifted, shifted[1:]))
    # A shift moves only the mean: the central moments still agree, so CMD is the mean distance.
    assert shifted[0] == pytest.approx(0.05 * 16 ** 0.5, rel=1e-4)
    assert central_moment_discrepancy(x, x * 2).item() > 0  # a change of spread is seen by the moments


@pytest.mark.parametrize("divergence", ["jsd", "l1", "l2"])
def test_sequential_variation_is_zero_for_constant_sequences_and_ignores_padding(divergence):
    torch.manual_seed(0)
    real = length_mask(torch.tensor([6, 3, 1, 4]), 6)
    constant = torch.randn(4, 1, 10).expand(4, 6, 10)
    assert sequential_variation(constant, real, divergence).item() == pytest.approx(0.0, abs=1e-7)

    varying = torch.randn(4, 6, 10)
    value = sequential_variation(varying, real, divergence)
    assert value.item() > 0
    noisy = varying + (~real).unsqueeze(-1) * torch.randn(4, 6, 10) * 100
    torch.testing.assert_close(sequential_variation(noisy, real, divergence), value)
    # Steps 3..5 of the second row are padding: making its real steps constant changes the loss,
    # making its padded steps constant does not.
    only_padding = varying.clone()
    only_padding[1, 3:] = 0.0
    torch.testing.assert_close(sequential_variation(only_padding, real, divergence), value)


def test_jsd_is_bounded_by_log_two():
    real = torch.ones(2, 2, dtype=torch.bool)
    opposite = torch.tensor([[[50.0, -50.0], [-50.0, 50.0]]] * 2)
    assert sequential_variation(opposite, real, "jsd").item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-4)


def test_a_length_one_modality_is_skipped_by_the_variation_regularizer():
    data_spec = spec(("text", "audio"), lengths={"text": 6, "audio": 1})
    torch.manual_seed(0)
    model = InvariantModel(data_spec, InvariantConfig(d=16, heads=2, dropout=0.0)).train()
    features, lengths, labels = batch(data_spec, 8)
    regularizer = model(features, lengths, labels).aux_losses["seqvar"]
    real = length_mask(lengths["text"], 6)
    projected = model.encoders["text"](features["text"], ~real)
    text_alone = sequential_variation(torch.cat([model.private["text"](projected), model.shared(projected)], -1),
                                      real, "jsd")
    assert text_alone.item() > 0
    torch.testing.assert_close(regularizer, text_alone)  # audio (one step) adds nothing and does not crash
    utterance_level = spec(("text", "audio"), lengths={"text": 1, "audio": 1})
    out = InvariantModel(utterance_level, InvariantConfig(d=16, heads=2)).train()(*batch(utterance_level, 8))
    assert "seqvar" not in out.aux_losses  # no modality has two steps


def test_the_gate_is_in_the_unit_interval_and_trainable():
    torch.manual_seed(0)
    model = InvariantModel(spec(), InvariantConfig(d=16, heads=2)).train()
    features, lengths, labels = batch(model.spec, 8)
    gate = model.gates["audio"]
    values = gate(torch.rand(8, 6, 16), torch.rand(8, 16))
    assert values.shape == (8, 6, 1) and (values > 0).all() and (values < 1).all()
    model(features, lengths, labels).prediction.sum().backward()
    assert gate.out.weight.grad.abs().sum() > 0 and gate.query.weight.grad.abs().sum() > 0
    # Each stream has its own gate (the released code reused one).
    assert gate is not model.gates["vision"]


def test_without_text_the_first_available_modality_queries():
    model = InvariantModel(spec(("audio", "vision")), InvariantConfig(d=16, heads=2))
    assert model.query == "audio" and model.others == ["vision"]
    assert InvariantModel(spec(), InvariantConfig(d=16, heads=2)).others == ["audio", "vision"]


def test_every_loss_switches_off_by_weight_zero():
    data_spec = spec()
    features, lengths, labels = batch(data_spec, 8)
    full = InvariantModel(data_spec, InvariantConfig(d=16, heads=2)).train()(features, lengths, labels)
    assert set(full.aux_losses) == {"adv", "cmd", "recon", "seqvar"}
    off = InvariantModel(data_spec, InvariantConfig(d=16, heads=2, w_adv=0, w_cmd=0, w_recon=0, w_seqvar=0))
    assert off.train()(features, lengths, labels).aux_losses == {}


@pytest.mark.parametrize("bad, message", [
    ({"d": 30, "heads": 4}, "heads \\(4\\) must divide d \\(30\\)"),
    ({"divergence": "kl"}, "divergence must be one of jsd, l1, l2, got 'kl'"),
    ({"grl_strength": -1.0}, "grl_strength must be >= 0"),
    ({"fbp_k": 0}, "fbp_hidden and fbp_k must be >= 1"),
    ({"w_recon": -0.1}, "w_recon must be >= 0, got -0.1"),
])
def test_impossible_configs_are_refused(bad, message):
    with pytest.raises(MsaError, match=message):
        InvariantConfig(**bad)


def test_every_aux_loss_reaches_the_training_history(synth_regression_pkl, tmp_path):
    from msa.platform.training.loop import train_loop

    result = train_loop({"model": "invariant", "data": str(synth_regression_pkl), "out": str(tmp_path / "inv"),
                         "epochs": 1, "batch_size": 16, "model_config": {"d": 16, "heads": 2}})
    with (result.out_dir / "history.csv").open() as handle:
        columns = set(next(csv.reader(handle)))
    assert {"train_adv", "train_cmd", "train_recon", "train_seqvar"} <= columns
