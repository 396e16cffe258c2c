"""The serving path of a registered model: the pyfunc classes' prediction code, and nothing else.

A registered model carries this module and what it imports (MLflow ``code_paths``, see
`code_paths.py`): the model classes, the checkpoint reader, the training loop's `predict` and
the text-encoder path. It imports no Ray, Optuna or DeepSpeed, and transformers only when a
checkpoint holds a text encoder, so a model loads where only torch, numpy and mlflow (and
transformers) are installed and `import msa` fails.

A checkpoint folder's model predicts like the training loop did: the loop's own `predict`
(same batch size, fp32 on CPU) under the torch thread count the checkpoint recorded, since float
sums follow it; so it reproduces the checkpoint's stored valid/test predictions bit for bit.

Runs in whichever process loads a registered model (`msa predict`, a serving process).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from msa.models.registry import build_model
from msa.platform.core.compat import untyped_python_model
from msa.platform.core.config import build_dataclass
from msa.platform.data.text import encode_texts, load_tokenizer
from msa.platform.data.text_cache import PREFIX_DTYPE
from msa.platform.training.checkpoint import Checkpoint
from msa.platform.training.config import TextEncoderConfig
from msa.platform.training.predict import predict
from msa.platform.training.text_encoder import TextEncoderModel, frozen_layers, load_encoder, prefix_states

LENGTHS_SUFFIX = "_lengths"
RAW_TEXT = "raw_text"
SEED_KEY = "checkpoint_seed"  # artifact key of seed <k> of a group: checkpoint_seed<k>


class CheckpointModel(untyped_python_model()):
    """A trained checkpoint folder, or a seed group's, as a pyfunc:
    ``predict({modality: (N,T,d), modality_lengths: (N,)})``; a seed group predicts its seeds'
    mean. Its signature (not type hints) describes the input, which MLflow enforces before
    `predict`."""

    def load_context(self, context) -> None:
        # One artifact "checkpoint", or one "checkpoint_seed<k>" per seed of a group, taken in
        # seed order: MLflow hands artifacts over sorted by key (seed10 before seed2), and the
        # mean's float sum follows the order.
        keys = sorted((key for key in context.artifacts if key == "checkpoint" or key.startswith(SEED_KEY)),
                      key=lambda key: -1 if key == "checkpoint" else int(key.removeprefix(SEED_KEY)))
        self.checkpoints = [LoadedCheckpoint(Path(context.artifacts[key])) for key in keys]

    def predict(self, context, model_input, params=None):
        # MLflow has enforced the signature (names, dtypes, shapes) before this is called.
        return mean_prediction(self.checkpoints, model_input)


def mean_prediction(checkpoints: list["LoadedCheckpoint"], inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The checkpoints' mean prediction (a seed group's, or an ensemble member's K fold models');
    one checkpoint's own, unchanged."""
    if len(checkpoints) == 1:
        return checkpoints[0].predict(inputs)
    return np.mean([checkpoint.predict(inputs) for checkpoint in checkpoints], axis=0)


class LoadedCheckpoint:
    """A checkpoint folder's model in eval mode, predicting like the training loop did."""

    def __init__(self, folder: Path):
        checkpoint = Checkpoint(folder)
        weights = checkpoint.verified_weights("checkpoint")
        self.config, self.spec = checkpoint.config, checkpoint.spec
        self.threads = checkpoint.metrics.get("torch_threads")  # absent in checkpoints of msa-sweep 0.1.0
        self.model = build_model(self.config["model"], self.spec, self.config["model_config"])
        self.text_encoding = checkpoint.text_encoding
        if self.text_encoding is not None:
            encoder_folder = checkpoint.verified_text_encoder("checkpoint")
            encoder = load_encoder(encoder_folder, pretrained=False)
            encoder_config = build_dataclass(TextEncoderConfig, self.config["text_encoder"], where=f"{folder} text_encoder")
            self.model = TextEncoderModel(encoder, self.model, frozen_layers(encoder_config, encoder.config.num_hidden_layers))
            self.tokenizer = load_tokenizer(encoder_folder)
        self.model.load_state_dict(torch.load(weights, weights_only=True))
        self.model.eval()

    @property
    def feature_modalities(self) -> tuple[str, ...]:
        """The modalities given as features (all but text when the model reads raw text)."""
        return tuple(m for m in self.spec.modalities if not (self.text_encoding and m == "text"))

    def inputs_of(self, split) -> dict[str, np.ndarray]:
        """A dataset split as this model's pyfunc input."""
        return split_inputs(split, self.feature_modalities, raw_text=self.text_encoding is not None)

    def predict(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """``{modality: (N, T, d), modality_lengths: (N,)[, raw_text: (N,)]}`` -> ``(N,)`` scores
        or ``(N, C)`` probabilities."""
        modalities = self.feature_modalities
        features = {m: torch.as_tensor(np.asarray(inputs[m], dtype=np.float32)) for m in modalities}
        lengths = {m: torch.as_tensor(np.asarray(inputs[m + LENGTHS_SUFFIX], dtype=np.int64)) for m in modalities}
        # The training loop's own predict with its batch size and thread count: the stored
        # predictions, exactly.
        with torch_threads(self.threads):
            if self.text_encoding is not None:
                ids, counts = encode_texts(self.tokenizer, np.asarray(inputs[RAW_TEXT]), self.text_encoding["max_length"])
                cached = self.text_encoding["prefix_layers"]  # trained on the prefix cache: computed, and rounded, as it was
                text = prefix_states(self.model, ids, counts, [cached])[cached].astype(PREFIX_DTYPE) if cached else ids
                features = {"text": torch.as_tensor(text), **features}
                lengths = {"text": torch.as_tensor(counts), **lengths}
            return predict(self.model, features, lengths, self.spec.task, int(self.config["batch_size"]))


@contextlib.contextmanager
def torch_threads(count: int | None):
    """torch's intra-op threads set to `count` inside the block (unchanged for None), then restored."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def split_inputs(split, modalities, *, raw_text: bool = False) -> dict[str, np.ndarray]:
    """A dataset split as the pyfunc input mapping (float32 features, int64 lengths, and the
    transcripts as strings when `raw_text`)."""
    inputs = {m: np.asarray(split.features[m], dtype=np.float32) for m in modalities}
    inputs.update({m + LENGTHS_SUFFIX: np.asarray(split.lengths[m], dtype=np.int64) for m in modalities})
    if raw_text:
        inputs[RAW_TEXT] = np.asarray(split.raw_text, dtype=str)
    return inputs
