"""The shared model test suite: every model in the registry gets all of these, for regression and
classification, on every modality subset it must accept.

Checks: output shapes, gradients reach every parameter, padded steps never change a prediction,
auxiliary losses are finite and weighted, a tiny batch can be overfitted, same seed same result.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from msa.models.base import ModelOutput
from msa.models.registry import MODELS, build_model
from msa.platform.core.spec import MODALITIES, DataSpec

DIMS = {"text": 12, "audio": 5, "vision": 7}
MAX_LENGTHS = {"text": 6, "audio": 9, "vision": 4}
NUM_CLASSES = 20


def modality_sets(min_modalities: int) -> list[tuple[str, ...]]:
    sets = [s for k in range(2, 4) for s in itertools.combinations(MODALITIES, k)]
    return sets + ([("text",)] if min_modalities == 1 else [])


CASES = [
    pytest.param(name, task, mods, id=f"{name}-{task}-{'+'.join(mods)}")
    for name, entry in MODELS.items()
    for task in ("regression", "classification")
    for mods in modality_sets(entry.min_modalities)
]


def make_spec(task: str, modalities: tuple[str, ...]) -> DataSpec:
    return DataSpec(
        dims={m: DIMS[m] for m in modalities},
        max_lengths={m: MAX_LENGTHS[m] for m in modalities},
        task=task,
        num_classes=NUM_CLASSES if task == "classification" else 0,
    )


def make_batch(spec: DataSpec, batch: int, seed: int = 0):
    """Random features with random lengths (at least 1) and zeroed padding, plus labels."""
    generator = torch.Generator().manual_seed(seed)
    features, lengths = {}, {}
    for m, d in spec.dims.items():
        t = spec.max_lengths[m]
        lengths[m] = torch.randint(1, t + 1, (batch,), generator=generator)
        mask = (torch.arange(t)[None, :] < lengths[m][:, None]).unsqueeze(-1)
        features[m] = torch.randn(batch, t, d, generator=generator) * mask
    if spec.task == "classification":
        labels = torch.randint(0, spec.num_classes, (batch,), generator=generator)
    else:
        labels = torch.rand(batch, generator=generator) * 6 - 3
    return features, lengths, labels


def total_loss(model, output: ModelOutput, labels: torch.Tensor, task: str) -> torch.Tensor:
    # MSE, not L1: an L1 gradient on the output bias is exactly 0 when signs split evenly.
    if task == "classification":
        loss = F.cross_entropy(output.prediction, labels)
    else:
        loss = F.mse_loss(output.prediction, labels)
    for name, value in output.aux_losses.items():
        loss = loss + model.loss_weights[name] * value
    return loss


def build(name: str, spec: DataSpec, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(name, spec)


@pytest.mark.parametrize("name,task,modalities", CASES)
def test_output_shapes(name, task, modalities):
    spec = make_spec(task, modalities)
    model = build(name, spec).eval()
    features, lengths, _ = make_batch(spec, 5)
    output = model(features, lengths)
    expected = (5,) if task == "regression" else (5, NUM_CLASSES)
    assert output.prediction.shape == expected
    assert output.fused.shape[0] == 5 and output.fused.dim() == 2


@pytest.mark.parametrize("name,task,modalities", CASES)
def test_gradients_reach_every_parameter(name, task, modalities):
    spec = make_spec(task, modalities)
    model = build(name, spec).train()
    features, lengths, labels = make_batch(spec, 16)
    total_loss(model, model(features, lengths, labels), labels, task).backward()
    unreached = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not unreached, f"no gradient reaches {unreached}"


@pytest.mark.parametrize("name,task,modalities", CASES)
def test_padded_steps_do_not_change_predictions(name, task, modalities):
    spec = make_spec(task, modalities)
    model = build(name, spec).eval()
    features, lengths, _ = make_batch(spec, 6)
    noisy = {}
    for m, x in features.items():
        pad = (torch.arange(x.shape[1])[None, :] >= lengths[m][:, None]).unsqueeze(-1)
        noisy[m] = x + pad * torch.randn_like(x) * 100.0
    with torch.no_grad():
        clean_out, noisy_out = model(features, lengths).prediction, model(noisy, lengths).prediction
    torch.testing.assert_close(noisy_out, clean_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,task,modalities", CASES)
def test_aux_losses_finite_and_weighted(name, task, modalities):
    spec = make_spec(task, modalities)
    model = build(name, spec).train()
    features, lengths, labels = make_batch(spec, 8)
    output = model(features, lengths, labels)
    for loss_name, value in output.aux_losses.items():
        assert value.dim() == 0 and torch.isfinite(value), loss_name
        assert loss_name in model.loss_weights, f"{loss_name} has no weight in loss_weights"


@pytest.mark.parametrize("name,task,modalities", CASES)
def test_overfits_a_tiny_batch(name, task, modalities):
    spec = make_spec(task, modalities)
    model = build(name, spec)
    features, lengths, labels = make_batch(spec, 8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def eval_task_loss() -> float:
        model.eval()
        with torch.no_grad():
            prediction = model(features, lengths).prediction
        model.train()
        if task == "classification":
            return F.cross_entropy(prediction, labels).item()
        return F.mse_loss(prediction, labels).item()

    initial = eval_task_loss()
    # Within 300 steps; checked every 25 so a model that gets there early stops early.
    for step in range(1, 301):
        optimizer.zero_grad()
        total_loss(model, model(features, lengths, labels), labels, task).backward()
        optimizer.step()
        if step % 25 == 0 and eval_task_loss() < 0.1 * initial:
            break
    assert eval_task_loss() < 0.1 * initial


@pytest.mark.parametrize("name", sorted(MODELS))
def test_same_seed_same_result(name):
    spec = make_spec("regression", ("text", "audio", "vision"))
    features, lengths, labels = make_batch(spec, 8)
    results = []
    for _ in range(2):
        model = build(name, spec, seed=3)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        torch.manual_seed(7)  # dropout masks
        for _ in range(3):
            optimizer.zero_grad()
            total_loss(model, model(features, lengths, labels), labels, "regression").backward()
            optimizer.step()
        results.append(model.eval()(features, lengths).prediction.detach())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    different = build(name, spec, seed=4).eval()(features, lengths).prediction.detach()
    assert not torch.equal(different, build(name, spec, seed=3).eval()(features, lengths).prediction.detach())


@pytest.mark.parametrize("task", ("regression", "classification"))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_trains_in_bf16_as_on_a_gpu(name, task):
    """As `train_loop` runs a model on a GPU (precision auto): bf16 weights and features, float32
    or int64 labels, losses summed in float32. The CPU has bf16 kernels too, so this runs here."""
    spec = make_spec(task, MODALITIES)
    model = build(name, spec).to(torch.bfloat16).train()
    features, lengths, labels = make_batch(spec, 8)
    output = model({m: x.to(torch.bfloat16) for m, x in features.items()}, lengths, labels)
    prediction = output.prediction.float()
    loss = F.cross_entropy(prediction, labels) if task == "classification" else F.l1_loss(prediction, labels)
    for loss_name, value in output.aux_losses.items():
        loss = loss + model.loss_weights[loss_name] * value.float()
    assert torch.isfinite(loss)
    loss.backward()
