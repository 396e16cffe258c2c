"""FINE's own parts (the shared suite covers its contract): the Dynamic Contrastive Queue, the MI
critics' bounds, the router's balance loss, the switches, and its losses reaching the history."""
from __future__ import annotations

import csv

import pytest
import torch

from msa.models.fine import FINEConfig, FINEModel, MixtureOfQFormers
from msa.models.layers import ConcatCritic, infonce_lower_bound, nce_club_upper_bound
from msa.platform.core.errors import MsaError
from msa.platform.core.spec import DataSpec

DIMS = {"text": 12, "audio": 5, "vision": 7}


def spec(task: str = "regression", modalities=("text", "audio", "vision")) -> DataSpec:
    return DataSpec(dims={m: DIMS[m] for m in modalities}, max_lengths={m: 6 for m in modalities}, task=task,
                    num_classes=20 if task == "classification" else 0)


def batch(data_spec: DataSpec, size: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    features = {m: torch.randn(size, 6, d, generator=generator) for m, d in data_spec.dims.items()}
    lengths = {m: torch.randint(1, 7, (size,), generator=generator) for m in data_spec.dims}
    if data_spec.task == "classification":
        return features, lengths, torch.randint(0, 20, (size,), generator=generator)
    return features, lengths, torch.rand(size, generator=generator) * 6 - 3


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_queue_keeps_at_most_its_size_per_class_and_only_detached_vectors(task):
    torch.manual_seed(0)
    model = FINEModel(spec(task), FINEConfig(queue_size=5)).train()
    seen = torch.zeros(model.dcq_classes, dtype=torch.long)
    for step in range(6):
        features, lengths, labels = batch(model.spec, 16, seed=step)
        model(features, lengths, labels)
        seen += torch.bincount(model._dcq_classes(labels), minlength=model.dcq_classes)
        assert not model.queue.requires_grad and model.queue.grad_fn is None
    assert torch.equal(model.queue_count, seen.clamp(max=5))
    filled = model.queue[model.queue_count > 0]
    assert torch.allclose(filled[:, 0].norm(dim=-1), torch.ones(len(filled)), atol=1e-5)  # L2-normalised projections
    # Evaluation and label-free forwards never touch the queue.
    before = model.queue.clone()
    model.eval()(features, lengths)
    model.train()(features, lengths)
    assert torch.equal(model.queue, before)


def test_queue_is_fifo_within_a_class():
    torch.manual_seed(0)
    model = FINEModel(spec(), FINEConfig(queue_size=3)).train()
    vectors = torch.nn.functional.normalize(torch.randn(5, model.config.d), dim=-1)
    model._enqueue(vectors, torch.full((5,), 2))
    assert int(model.queue_count[2]) == 3
    # Slots hold the last three in ring order: 3, 4 overwrote slots 0, 1; slot 2 holds vector 2.
    assert torch.equal(model.queue[2], torch.stack([vectors[3], vectors[4], vectors[2]]))


def test_infonce_estimate_rises_on_correlated_inputs_and_club_bounds_it():
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    y = x @ torch.randn(8, 8) + 0.3 * torch.randn(512, 8)
    critic = ConcatCritic(8, 8, hidden=64)
    optimizer = torch.optim.Adam(critic.parameters(), lr=3e-3)
    for step in range(300):
        rows = torch.randint(0, 384, (64,))
        optimizer.zero_grad()
        (-infonce_lower_bound(critic.scores(x[rows], y[rows]))).backward()
        optimizer.step()
    held_x, held_y = x[384:448], y[384:448]
    with torch.no_grad():
        correlated = infonce_lower_bound(critic.scores(held_x, held_y))
        shuffled = infonce_lower_bound(critic.scores(held_x, held_y[torch.randperm(64)]))
        upper = nce_club_upper_bound(critic.scores(held_x, held_y))
    assert correlated > 1.0 and correlated > shuffled + 1.0
    assert shuffled < 0.3
    assert upper >= correlated


def test_frozen_critic_scores_pass_gradients_to_codes_only():
    critic = ConcatCritic(4, 4, hidden=8)
    x, y = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4)
    nce_club_upper_bound(critic.scores(x, y, frozen=True)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in critic.parameters())
    assert torch.equal(critic.scores(x, y, frozen=True), critic.scores(x, y))


def test_frozen_critic_scores_run_the_critic_on_its_own_parameters():
    """What ZeRO-3 needs (test_zero3.py): frozen scores run the critic's modules on their own
    parameters, never on stand-ins for them, and leave the critic trainable (a parameter its owner
    froze stays frozen)."""
    critic = ConcatCritic(4, 4, hidden=8)
    critic.net[0].bias.requires_grad_(False)
    weight, own = critic.net[0].weight, []
    critic.net[0].register_forward_pre_hook(lambda module, args: own.append(module._parameters["weight"] is weight))
    x, y = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4)
    critic.scores(x, y, frozen=True)
    assert own == [True]
    assert [p.requires_grad for p in critic.parameters()] == [True, False, True]
    infonce_lower_bound(critic.scores(x, y)).backward()
    assert critic.net[0].weight.grad.abs().sum() > 0 and critic.net[0].bias.grad is None


def test_router_balance_loss_is_minimal_for_uniform_routing():
    torch.manual_seed(0)
    config = FINEConfig(d=16, heads=2, n_experts=4, top_k=1)
    moq = MixtureOfQFormers(config).eval()
    sequence, lengths = torch.randn(64, 5, 16), torch.randint(1, 6, (64,))
    torch.nn.init.zeros_(moq.router.weight)
    torch.nn.init.zeros_(moq.router.bias)
    _, uniform = moq(sequence, lengths)
    assert uniform.item() == pytest.approx(1.0)  # E * sum_e f_e * (1/E)
    for seed in range(5):
        torch.manual_seed(seed)
        torch.nn.init.normal_(moq.router.weight, std=1.0)
        torch.nn.init.normal_(moq.router.bias, std=2.0)
        _, skewed = moq(sequence, lengths)
        assert skewed.item() > uniform.item()


def test_an_expert_no_sample_chose_still_gets_gradient_but_no_output():
    torch.manual_seed(0)
    moq = MixtureOfQFormers(FINEConfig(d=16, heads=2, n_experts=4, top_k=1, dropout=0.0)).train()
    torch.nn.init.zeros_(moq.router.weight)
    with torch.no_grad():
        moq.router.bias.copy_(torch.tensor([5.0, 0.0, -5.0, -50.0]))  # every sample picks expert 0
    sequence, lengths = torch.randn(8, 5, 16), torch.randint(1, 6, (8,))
    mixed, _ = moq(sequence, lengths)
    # The output is plain top-1 routing: expert 0 alone.
    torch.testing.assert_close(mixed, moq.experts(sequence, lengths)[:, 0])
    mixed.pow(2).sum().backward()
    per_expert = moq.experts.queries.grad.abs().sum((1, 2))
    assert (per_expert > 0).all(), per_expert  # experts 1-3 were chosen by no sample
    # In evaluation an unchosen expert gets nothing.
    moq.zero_grad()
    moq.eval()(sequence, lengths)[0].pow(2).sum().backward()
    assert moq.experts.queries.grad[1:].abs().sum() == 0


def test_every_part_switches_off_from_the_config():
    data_spec = spec()
    features, lengths, labels = batch(data_spec, 8, seed=0)
    full = FINEModel(data_spec, FINEConfig()).train()(features, lengths, labels)
    assert set(full.aux_losses) == {"recon", "balance", "mi_shared", "mi_unique", "mi_task_shared", "mi_task_unique",
                                    "critic", "unimodal", "contrastive"}
    off = FINEModel(data_spec, FINEConfig(use_moq=False, use_dcq=False, w_mi_shared=0, w_mi_unique=0,
                                          w_mi_task_shared=0, w_mi_task_unique=0, w_recon=0, w_unimodal=0))
    assert not off.critics and not hasattr(off, "queue") and off.shared_label is None
    assert not any("router" in name for name, _ in off.named_parameters())
    assert off.train()(features, lengths, labels).aux_losses == {}
    # Label-free forwards (evaluation) compute no label-dependent term.
    unlabelled = FINEModel(data_spec, FINEConfig()).train()(features, lengths)
    assert set(unlabelled.aux_losses) == {"recon", "balance", "mi_shared", "mi_unique", "critic"}


@pytest.mark.parametrize("bad, message", [
    ({"d": 30, "heads": 4}, "heads \\(4\\) must divide d \\(30\\)"),
    ({"n_experts": 2, "top_k": 3}, "top_k must be in \\[1, n_experts=2\\]"),
    ({"regression_classes": 5}, "regression_classes must be 3 or 7"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"w_recon": -0.1}, "w_recon must be >= 0, got -0.1"),
])
def test_impossible_configs_are_refused(bad, message):
    with pytest.raises(MsaError, match=message):
        FINEConfig(**bad)


def test_every_aux_loss_reaches_the_training_history(synth_regression_pkl, tmp_path):
    from msa.platform.training.loop import train_loop

    result = train_loop({"model": "fine", "data": str(synth_regression_pkl), "out": str(tmp_path / "fine"),
                         "epochs": 1, "batch_size": 16, "model_config": {"d": 16, "heads": 2, "critic_hidden": 32}})
    with (result.out_dir / "history.csv").open() as handle:
        columns = set(next(csv.reader(handle)))
    for name in ("recon", "balance", "mi_shared", "mi_unique", "mi_task_shared", "mi_task_unique", "critic",
                 "unimodal", "contrastive"):
        assert f"train_{name}" in columns
