"""DeepSpeed ZeRO stage 3 with every registered model, on the CPU, through the engine helpers the
training loop uses: on one rank each model (alone and behind a text encoder) gets ZeRO 0's
gradients and, after a step, ZeRO 0's predictions; and FINE trains on two ranks that really
partition it."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import synth_data

from msa.models.registry import MODELS, build_model
from msa.platform.core.spec import DataSpec
from msa.platform.data.readers import load_dataset
from msa.platform.training.config import TrainConfig
from msa.platform.training.engine import deepspeed_config, ensure_process_group, import_deepspeed, seed_everything
from msa.platform.training.predict import task_loss
from msa.platform.training.text_encoder import TextEncoderModel, load_encoder

DIMS = {"text": 12, "audio": 5, "vision": 7}
MAX_LENGTHS = {"text": 6, "audio": 9, "vision": 4}
BATCH = 8
# Small widths keep each engine cheap; a model not listed is built with its defaults.
SMALL = {
    "fine": {"d": 16, "heads": 2, "n_queries": 2, "n_experts": 2, "top_k": 1, "fusion_depth": 1, "critic_hidden": 16,
             "queue_size": 8},
    "dbr": {"d": 16, "heads": 2, "segments": 2, "n_anchors": 2},
    "invariant": {"d": 16, "heads": 2, "fbp_hidden": 8},
}


def make_batch(spec: DataSpec, vocabulary: int | None):
    """Random padded features (token ids for the text when `vocabulary` is given) and scores."""
    generator = torch.Generator().manual_seed(0)
    features, lengths = {}, {}
    for m, d in spec.dims.items():
        t = MAX_LENGTHS[m]
        lengths[m] = torch.randint(1, t + 1, (BATCH,), generator=generator)
        real = (torch.arange(t)[None, :] < lengths[m][:, None]).unsqueeze(-1)
        features[m] = torch.randn(BATCH, t, d, generator=generator) * real
    if vocabulary is not None:
        features["text"] = torch.randint(5, vocabulary, (BATCH, MAX_LENGTHS["text"]), generator=generator)
    return features, lengths, torch.rand(BATCH, generator=generator) * 6 - 3


def one_step(name: str, encoder_folder, zero_stage: int):
    """The model's gradients after one backward of the loop's loss, and its eval predictions after
    one SGD step, on a one-rank engine at `zero_stage` (the same weights, batch and dropout masks
    for every stage)."""
    deepspeed = import_deepspeed(use_cuda=False)
    ensure_process_group(deepspeed, use_cuda=False)
    encoder = load_encoder(encoder_folder) if encoder_folder else None
    dims = {**DIMS, "text": encoder.config.hidden_size} if encoder is not None else DIMS
    spec = DataSpec(dims=dims, max_lengths=MAX_LENGTHS, task="regression")
    torch.manual_seed(0)
    model = build_model(name, spec, SMALL.get(name))
    if encoder is not None:
        model = TextEncoderModel(encoder, model, frozen=1)  # one frozen layer, one trained
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    config = deepspeed_config(TrainConfig(batch_size=BATCH, zero_stage=zero_stage, grad_clip=0.0), "fp32")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    assert engine.zero_optimization_stage() == zero_stage
    features, lengths, labels = make_batch(spec, encoder.config.vocab_size if encoder is not None else None)
    torch.manual_seed(1)
    output = engine(features, lengths, labels)
    loss = task_loss(output.prediction, labels, "regression", "l1")
    for term, value in output.aux_losses.items():
        loss = loss + engine.module.loss_weights[term] * value
    engine.backward(loss)
    gradients = {n: deepspeed.utils.safe_get_full_grad(p)
                 for n, p in engine.module.named_parameters() if p.requires_grad}
    engine.step()
    engine.eval()
    with torch.no_grad():
        prediction = engine(features, lengths).prediction
    return gradients, prediction


@pytest.fixture
def torch_linear():
    """A ZeRO-3 engine swaps ``torch.nn.functional.linear`` for DeepSpeed's own for the whole
    process and leaves it there: put torch's back, so that each ZeRO 0 reference, and the tests
    after these, compute with torch's."""
    yield
    torch.nn.functional.linear = torch._C._nn.linear


@pytest.mark.parametrize("with_encoder", [False, True], ids=["features", "text-encoder"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_zero3_on_one_rank_computes_what_zero0_computes(name, with_encoder, tiny_bert, torch_linear):
    """ZeRO-3 partitions every weight and gathers it only around the forward and backward of the
    module that owns it (or that read it): a model computing with weights it has not gathered (a
    module called with stand-in tensors for its parameters, a forward whose outputs ZeRO-3
    cannot follow into the backward) fails here or gets other gradients."""
    encoder = tiny_bert if with_encoder else None
    reference, reference_prediction = one_step(name, encoder, zero_stage=0)
    gradients, prediction = one_step(name, encoder, zero_stage=3)
    assert gradients.keys() == reference.keys()
    for parameter, expected in reference.items():
        got = gradients[parameter]
        assert got is not None and got.shape == expected.shape, parameter
        scale = float(expected.abs().max())
        assert float((got - expected).abs().max()) <= 1e-4 * scale + 1e-8, parameter
    torch.testing.assert_close(prediction, reference_prediction, rtol=1e-4, atol=1e-5)


RANK_PROGRAM = """
import json, os, sys
from pathlib import Path

import torch

torch.set_num_threads(1)  # two ranks on the machine's cores
torch.distributed.init_process_group("gloo", init_method=sys.argv[1], rank=int(os.environ["RANK"]), world_size=2)
from msa.platform.training.loop import train_loop

state = Path(sys.argv[3])


def save_last(record, save_state):
    if record["final"]:
        save_state(state)


result = train_loop(json.loads(sys.argv[2]), on_epoch=save_last, replace_stale_out=True)
print(json.dumps({"world": torch.distributed.get_world_size(), "valid": result.valid_metrics}))
"""


def train_on_two_ranks(config: dict, folder: Path, env: dict[str, str], timeout: float = 240) -> list[dict]:
    """`train_loop(config)` on two ranks (two processes in one gloo group, as two Ray Train
    workers run it), its state saved after the last epoch into ``folder/state``; each rank's
    summary. A rank that fails stops the other at once (it would wait in a collective)."""
    rendezvous, state = (folder / "rendezvous").as_uri(), str(folder / "state")
    args = [sys.executable, "-c", RANK_PROGRAM, rendezvous, json.dumps(config), state]
    logs = [folder / f"rank{rank}.log" for rank in range(2)]
    handles = [log.open("w") for log in logs]
    ranks = [subprocess.Popen(args, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"},
                              stdout=handle, stderr=subprocess.STDOUT) for rank, handle in enumerate(handles)]
    deadline = time.monotonic() + timeout
    try:
        while any(rank.poll() is None for rank in ranks) and time.monotonic() < deadline:
            if any(rank.poll() for rank in ranks):  # one failed
                break
            time.sleep(0.2)
    finally:
        for rank, handle in zip(ranks, handles):
            if rank.poll() is None:
                rank.kill()
            rank.wait()
            handle.close()
    summaries = []
    for rank, log in zip(ranks, logs):
        lines = log.read_text().splitlines()
        assert rank.returncode == 0, "\n".join(lines[-60:])
        summaries.append(json.loads(next(line for line in reversed(lines) if line.startswith('{"world"'))))
    return summaries


def test_fine_trains_under_zero3_on_two_ranks(driver, tmp_path):
    """A small FINE, one epoch of two steps per rank: both ranks finish, each keeps its own shard
    of the optimizer state, and the checkpoint holds the whole trained model gathered from both.
    65 train clips do not split evenly over two ranks; each still takes two steps (one more on one
    rank would hang the other in a collective)."""
    data = synth_data(tmp_path, "zero3", sizes={"train": 65, "valid": 16, "test": 16})
    model_config = SMALL["fine"]
    config = {"model": "fine", "data": str(data), "out": str(tmp_path / "run"), "epochs": 1, "batch_size": 16,
              "seed": 0, "zero_stage": 3, "model_config": model_config}
    ranks = train_on_two_ranks(config, tmp_path, driver.env)

    assert [rank["world"] for rank in ranks] == [2, 2]
    assert ranks[0]["valid"] == ranks[1]["valid"]  # both ranks predict with the same gathered weights
    for rank in range(2):  # ZeRO-3 partitioned the optimizer state over both ranks
        assert list((tmp_path / "state").rglob(f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
    weights = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    seed_everything(0)  # as the run built it
    initial = build_model("fine", load_dataset(str(data)).spec, model_config).state_dict()
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in initial.items()}
    assert all(np.isfinite(v.numpy()).all() for v in weights.values())
    critic = "critics.unique:text-audio.net.0.weight"  # trained by the critic loss, never by the CLUB estimate
    assert not torch.equal(weights[critic], initial[critic])
