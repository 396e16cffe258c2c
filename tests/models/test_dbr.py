"""DBR's own parts (the shared suite covers its contract): AGPR's routing budget, TSF's gate, the
segment pooling, DMD's margin loss, the module switches, MIntRec-style classification through the
training loop, and its losses reaching the training history."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from msa.models.dbr import (
    AnchorGuidedPrivateRouting,
    DBRConfig,
    DBRModel,
    TemporalStructuralFusion,
    hinge_margin_loss,
    segment_pool,
)
from msa.models.layers import length_mask
from msa.platform.core.errors import MsaError
from msa.platform.core.spec import DataSpec

DIMS = {"text": 12, "audio": 5, "vision": 7}
MODALITIES = ("text", "audio", "vision")


def spec(modalities=MODALITIES, task="regression") -> DataSpec:
    return DataSpec(dims={m: DIMS[m] for m in modalities}, max_lengths={m: 6 for m in modalities}, task=task,
                    num_classes=20 if task == "classification" else 0)


def batch(data_spec: DataSpec, size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    features, lengths = {}, {}
    for m, d in data_spec.dims.items():
        lengths[m] = torch.randint(1, 7, (size,), generator=generator)
        features[m] = torch.randn(size, 6, d, generator=generator) * length_mask(lengths[m], 6).unsqueeze(-1)
    return features, lengths, torch.rand(size, generator=generator) * 6 - 3


@pytest.mark.parametrize("alpha_max", [0.1, 0.5, 1.0])
def test_the_routing_budget_is_never_exceeded(alpha_max):
    torch.manual_seed(0)
    config = DBRConfig(d=16, heads=2, alpha_max=alpha_max)
    agpr = AnchorGuidedPrivateRouting(MODALITIES, config)
    for seed in range(5):
        torch.manual_seed(seed)
        for layer in agpr.budget.values():  # push every budget towards its cap
            torch.nn.init.normal_(layer.weight, std=10.0)
            torch.nn.init.constant_(layer.bias, 20.0)
        private = {m: torch.randn(32, config.segments, 16) * 10 for m in MODALITIES}
        weights = agpr.routing({m: x.mean(1) for m, x in private.items()})
        for m in MODALITIES:
            assert weights[m].shape == (32, 2)
            assert (weights[m] >= 0).all()
            assert (weights[m].sum(-1) <= alpha_max + 1e-6).all()
        assert max(w.sum(-1).max().item() for w in weights.values()) > 0.99 * alpha_max  # the cap is reachable


def test_with_alpha_max_zero_the_private_streams_borrow_nothing():
    torch.manual_seed(0)
    agpr = AnchorGuidedPrivateRouting(MODALITIES, DBRConfig(d=16, heads=2, alpha_max=0.0)).eval()
    private = {m: torch.randn(4, 8, 16) for m in MODALITIES}
    routed, weights = agpr(private)
    for m in MODALITIES:
        assert torch.equal(weights[m], torch.zeros_like(weights[m]))
        torch.testing.assert_close(routed[m], private[m], rtol=0, atol=0)
    # ... while a positive cap does change them.
    borrowing = AnchorGuidedPrivateRouting(MODALITIES, DBRConfig(d=16, heads=2, alpha_max=0.5)).eval()
    assert not torch.allclose(borrowing(private)[0]["text"], private["text"])


def test_the_tsf_gate_stays_in_the_unit_interval():
    torch.manual_seed(0)
    tsf = TemporalStructuralFusion(3, DBRConfig(d=16, heads=2)).eval()
    for scale in (1.0, 100.0):
        shared = torch.randn(4, 3, 8, 16) * scale
        merged, gate, temporal, structural = tsf(shared)
        assert gate.shape == shared.shape and (gate >= 0).all() and (gate <= 1).all()
        torch.testing.assert_close(merged, gate * temporal + (1 - gate) * structural)


def test_segment_pooling_averages_real_steps_only():
    x = torch.arange(6.0).view(1, 6, 1).repeat(3, 1, 1)  # steps 0..5
    x[1, 2:] = 1000.0  # padding of the length-2 row
    pooled = segment_pool(x, torch.tensor([6, 2, 1]), segments=3)
    assert pooled[0, :, 0].tolist() == [0.5, 2.5, 4.5]
    assert pooled[1, :, 0].tolist() == [0.0, 0.5, 1.0]  # segment 1 of a 2-step row spans both steps
    assert pooled[2, :, 0].tolist() == [0.0, 0.0, 0.0]  # one step repeats


def test_margin_loss_is_zero_when_same_labels_agree_and_positive_when_they_do_not():
    labels = torch.tensor([1.0, 1.0, -2.0, -2.0])
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    separated = torch.stack([e1, e1, e2, e2])
    assert hinge_margin_loss(separated, labels, classification=False).item() == pytest.approx(0.0)
    swapped = torch.stack([e1, e2, e1, e2])
    # Each anchor: its positive at cosine 0, negatives at cosine 1 and 0, margin 0.15 * 3:
    # mean(0.45 - 0 + 1, 0.45 - 0 + 0) = 0.95.
    assert hinge_margin_loss(swapped, labels, classification=False).item() == pytest.approx(0.95)
    # No pair of same-label and different-label codes: the loss is 0, not NaN.
    assert hinge_margin_loss(separated[:2], labels[:2], classification=False).item() == 0.0


def test_every_module_switches_off_to_the_plain_decoupling_path():
    data_spec = spec()
    features, lengths, labels = batch(data_spec, 8)
    full = DBRModel(data_spec, DBRConfig(d=16, heads=2)).train()
    assert set(full(features, lengths, labels).aux_losses) == {"recon", "selfreg", "ortho", "margin", "anchor", "decorr"}
    plain = DBRModel(data_spec, DBRConfig(d=16, heads=2, use_tsf=False, use_agpr=False, use_brf=False)).train()
    assert plain.tsf is None and plain.agpr is None and plain.brf is None
    out = plain(features, lengths, labels)
    assert set(out.aux_losses) == {"recon", "selfreg", "ortho", "margin"}
    assert out.fused.shape == (8, 32)  # [pooled private; pooled shared]
    silent = DBRModel(data_spec, DBRConfig(d=16, heads=2, w_recon=0, w_selfreg=0, w_ortho=0, w_margin=0,
                                           w_anchor=0, w_decorr=0)).train()
    assert silent(features, lengths, labels).aux_losses == {}


@pytest.mark.parametrize("bad, message", [
    ({"d": 30, "heads": 4}, "heads \\(4\\) must divide d \\(30\\)"),
    ({"conv_kernel": 4}, "conv_kernel must be odd"),
    ({"alpha_max": 1.5}, "alpha_max must be in \\[0, 1\\]"),
    ({"segments": 0}, "segments must be >= 1"),
    ({"anchor_temperature": 0.0}, "anchor_temperature must be > 0"),
    ({"w_recon": -0.1}, "w_recon must be >= 0, got -0.1"),
])
def test_impossible_configs_are_refused(bad, message):
    with pytest.raises(MsaError, match=message):
        DBRConfig(**bad)


def test_mintrec_style_classification_trains(synth_classification_npz, tmp_path):
    from msa.platform.training.loop import train_loop

    result = train_loop({"model": "dbr", "data": str(synth_classification_npz), "out": str(tmp_path / "dbr"),
                         "epochs": 6, "batch_size": 32, "lr": 2e-3, "patience": 6,
                         "model_config": {"d": 32, "heads": 2, "segments": 4}})
    metrics = json.loads((result.out_dir / "metrics.json").read_text())
    with (result.out_dir / "history.csv").open() as handle:
        history = list(csv.DictReader(handle))
    assert float(history[-1]["train_task_loss"]) < 0.7 * float(history[0]["train_task_loss"])
    assert metrics["valid"]["acc"] > 3 * (100 / 20)  # well above the 5% of chance (20 classes)
    for name in ("recon", "selfreg", "ortho", "margin", "anchor", "decorr"):
        assert f"train_{name}" in history[0]
