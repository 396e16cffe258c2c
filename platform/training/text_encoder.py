"""A Hugging Face text encoder inside any registered model, and its frozen-prefix cache.

`TextEncoderModel` wraps a registered model: the encoder reads the ``text`` token ids, and its
per-token hidden states (padding zeroed, lengths from the attention mask) take the place of the
text features, so every model gets an encoder without code of its own. The encoder's
parameters sit in the same module as the model's, hence in the same DeepSpeed engine (ZeRO
shards them, bf16 casts them), with their own parameter groups (`parameter_groups`).

With ``freeze_layers: k`` the embeddings and the first k layers are frozen and stay in eval
mode (no dropout), so their output depends on the data alone: `prefix_entries` computes it once per
(dataset, encoder weights, k, max_length) into the text cache, and a model given those hidden
states in place of the ids runs only the layers above k, with the same result as running all of
them (up to the cache's float16 rounding of the frozen layers' output).

Runs wherever `train_loop` runs, in the driver (the prefix cache of a sweep), and in the process
that serves a registered encoder model. The encoder is assumed to be of the BERT family (BERT,
RoBERTa, MiniLM, ELECTRA, XLM-R...): embeddings, then ``encoder.layer``; others are refused.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from msa.platform.core.compat import bidirectional_attention_mask
from msa.platform.core.errors import MsaError
from msa.platform.data.features import FeatureSet
from msa.platform.data.text import EncoderInfo, offline, resolve_encoder
from msa.platform.data.text_cache import PREFIX_DTYPE, CacheEntry, TextCache, cache_root, token_entry
from msa.platform.training.config import TextEncoderConfig

PREFIX_BATCH = 64  # rows per forward pass when the frozen prefix is computed


def frozen_layers(config: TextEncoderConfig, depth: int) -> int:
    """How many layers (with the embeddings) are frozen: all of them when not fine-tuning."""
    return depth if not config.finetune else config.freeze_layers


def cached_layers(config: TextEncoderConfig, depth: int) -> int:
    """How many layers the prefix cache covers for this config (0: none, ids go to the model)."""
    return frozen_layers(config, depth) if config.prefix_cache else 0


def check_depth(config: TextEncoderConfig, encoder: EncoderInfo) -> None:
    """Raises MsaError when ``freeze_layers`` exceeds the encoder's depth."""
    if config.freeze_layers > encoder.depth:
        raise MsaError(f"text_encoder.freeze_layers is {config.freeze_layers} but the encoder at {encoder.folder} "
                       f"has {encoder.depth} layers")


def load_encoder(folder, *, pretrained: bool = True) -> nn.Module:
    """The encoder of a Hugging Face folder: with its weights, or only its architecture (a
    checkpoint then loads its fine-tuned weights into it)."""
    offline()
    import transformers  # deferred: seconds of imports, only when an encoder is configured

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        if pretrained:
            return transformers.AutoModel.from_pretrained(str(folder))
        return transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(str(folder)))
    except Exception as exc:  # a broken model folder can raise nearly anything
        raise MsaError(f"{folder}: cannot load its encoder ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


def _layers(encoder: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(encoder, "embeddings"):
        raise MsaError(f"text encoder {type(encoder).__name__} is not of the BERT family (embeddings, then "
                       f"encoder.layer); use a BERT, RoBERTa, MiniLM or similar encoder")
    return layers


def length_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """``(B, width)`` 1 on the real tokens, 0 on padding."""
    return (torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]).long()


class TextEncoderModel(nn.Module):
    """A registered model with a text encoder in front of its ``text`` input.

    Args:
        encoder: a Hugging Face BERT-family encoder.
        model: the registered model, built for the encoder's hidden size as its text dimension.
        frozen: embeddings and the first `frozen` layers frozen (0: nothing).
        gradient_checkpointing: recompute the trained layers' activations in backward.
    """

    def __init__(self, encoder: nn.Module, model: nn.Module, frozen: int, *, gradient_checkpointing: bool = False):
        super().__init__()
        self.encoder, self.model, self.frozen = encoder, model, frozen
        self.layers = _layers(encoder)
        for child in encoder.children():  # the pooler and the like: not on the path to the model
            if child is not encoder.encoder and child is not encoder.embeddings:
                child.requires_grad_(False)
        for module in self._frozen_modules():
            module.requires_grad_(False)
        if gradient_checkpointing:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @property
    def loss_weights(self):
        return self.model.loss_weights

    @property
    def config(self):
        return self.model.config

    @property
    def depth(self) -> int:
        return len(self.layers)

    def _frozen_modules(self) -> list[nn.Module]:
        return [self.encoder.embeddings, *self.layers[: self.frozen]] if self.frozen else []

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen_modules():  # frozen layers are feature extractors: no dropout
            module.eval()
        return self

    def run_layers(self, hidden: torch.Tensor, lengths: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Hidden states after layers ``start..stop-1`` (counted from 0) given those before `start`."""
        if start >= stop:
            return hidden
        mask = bidirectional_attention_mask(self.encoder.config, hidden, length_mask(lengths, hidden.shape[1]))
        for layer in self.layers[start:stop]:
            hidden = layer(hidden, mask)
        return hidden

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))

    def prefix(self, ids: torch.Tensor, lengths: torch.Tensor, layers: int) -> torch.Tensor:
        """Hidden states after the embeddings and the first `layers` layers (no gradient: frozen)."""
        with torch.no_grad():
            return self.run_layers(self.embed(ids), lengths, 0, layers)

    def forward(self, features: dict[str, torch.Tensor], lengths: dict[str, torch.Tensor], labels=None):
        text, text_lengths = features["text"], lengths["text"]
        if text.is_floating_point():  # hidden states after the frozen prefix (the cache)
            hidden = text
        elif self.frozen:
            hidden = self.prefix(text, text_lengths, self.frozen)
        else:
            hidden = self.embed(text)
        hidden = self.run_layers(hidden, text_lengths, self.frozen, self.depth)
        hidden = hidden * length_mask(text_lengths, hidden.shape[1]).unsqueeze(-1).to(hidden.dtype)
        return self.model({**features, "text": hidden}, lengths, labels)


def parameter_groups(model: nn.Module, lr: float, weight_decay: float, config: TextEncoderConfig) -> list[dict]:
    """AdamW groups: the model at `lr`; each trained encoder layer at ``config.lr`` scaled by
    ``layer_decay`` per layer below the top (the embeddings one step below layer 0)."""
    if not isinstance(model, TextEncoderModel):
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr, "weight_decay": weight_decay}]
    groups = [{"params": list(model.model.parameters()), "lr": lr, "weight_decay": weight_decay}]
    depth = model.depth
    stages = [(depth, model.encoder.embeddings)] + [(depth - 1 - i, layer) for i, layer in enumerate(model.layers)]
    for steps_below_top, module in stages:
        params = [p for p in module.parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": config.lr * config.layer_decay**steps_below_top,
                           "weight_decay": weight_decay})
    return groups


def encoder_inputs(dataset: FeatureSet, config: TextEncoderConfig) -> tuple[FeatureSet, EncoderInfo]:
    """`dataset` as the model of `config` reads it: token ids, or the cached prefix's hidden
    states; read from the text cache (`msa.platform.data.text_cache`), computed into it first
    when missing, unless the caller (a sweep's trial) passes them already.

    Raises:
        MsaError: see `resolve_encoder`, `tokenize` and `check_depth`; or data tokenized by another
            tokenizer or to another length than the config's.
    """
    encoder = resolve_encoder(config.path)
    check_depth(config, encoder)
    wanted = cached_layers(config, encoder.depth)
    if dataset.text_encoding is None:
        cache = TextCache(cache_root(config.cache_dir))
        tokens = token_entry(dataset, encoder, config.max_length, cache)
        entry = tokens if wanted == 0 else prefix_entries(tokens, encoder, [wanted], cache)[wanted]
        return entry.apply(dataset), encoder
    encoding = dataset.text_encoding
    if (encoding.tokenizer_sha256, encoding.max_length) != (encoder.tokenizer_sha256, config.max_length):
        raise MsaError(f"{dataset.source or dataset.name}: its token ids were made by another tokenizer or to "
                       f"another length ({encoding.max_length}) than text_encoder's ({config.max_length})")
    if encoding.prefix_layers != wanted:
        raise MsaError(f"{dataset.source or dataset.name}: holds the hidden states after {encoding.prefix_layers} "
                       f"layers, the config freezes {wanted}")
    return dataset, encoder


def prefix_batches(model: TextEncoderModel, ids: np.ndarray, lengths: np.ndarray, layers: list[int]):
    """Per block of `PREFIX_BATCH` rows, the hidden states after the first k layers for each k
    in `layers` (``{k: (B, L, h)}`` float32 tensors on the model's device), computed in eval mode
    in one pass through the layers."""
    model.eval()
    device = next(model.parameters()).device
    ids_t, lengths_t = torch.as_tensor(ids), torch.as_tensor(lengths)
    with torch.no_grad():
        for start in range(0, len(ids), PREFIX_BATCH):
            part = slice(start, start + PREFIX_BATCH)
            batch_lengths = lengths_t[part].to(device)
            hidden, done, out = model.embed(ids_t[part].to(device)), 0, {}
            for k in sorted(layers):
                hidden = model.run_layers(hidden, batch_lengths, done, k)
                done = k
                out[k] = hidden.float()
            yield out


def prefix_states(model: TextEncoderModel, ids: np.ndarray, lengths: np.ndarray, layers: list[int]) -> dict[int, np.ndarray]:
    """Hidden states after the first k layers for each k in `layers`, as float32 ``(N, L, h)``
    arrays (`prefix_batches`, gathered)."""
    parts: dict[int, list[np.ndarray]] = {k: [] for k in layers}
    for block in prefix_batches(model, ids, lengths, layers):
        for k, hidden in block.items():
            parts[k].append(hidden.cpu().numpy())
    return {k: np.concatenate(blocks) for k, blocks in parts.items()}


def prefix_entries(tokens: CacheEntry, encoder: EncoderInfo, depths: list[int], cache: TextCache) -> dict[int, CacheEntry]:
    """The text-cache entries of `encoder`'s pretrained prefix at each depth in `depths`, over
    the token ids of `tokens`; the missing ones computed in one pass through the layers (on a
    GPU when this process has one), streamed to disk as float16 block by block, so no depth is
    ever whole in memory.

    Raises:
        MsaError: hidden states that do not fit float16 (an encoder without layer norms).
    """
    weights_sha256 = encoder.weights_sha256()
    keys = {k: dataclasses.replace(tokens.key(), depth=k, encoder_sha256=weights_sha256) for k in depths}
    found = {k: cache.get(key) for k, key in keys.items()}
    missing = sorted(k for k, entry in found.items() if entry is None)
    if not missing:
        return found
    model = TextEncoderModel(load_encoder(encoder.folder), nn.Identity(), encoder.depth)
    if torch.cuda.is_available():
        model = model.cuda()
    writers = {k: cache.writer(keys[k], hidden_size=encoder.hidden_size, source=tokens.meta["source"],
                               dataset=tokens.meta["dataset"]) for k in missing}
    try:
        for split, (ids, lengths) in tokens.arrays().items():
            for writer in writers.values():
                writer.start(split, (*ids.shape, encoder.hidden_size), PREFIX_DTYPE)
            for block in prefix_batches(model, ids, lengths, missing):
                for k, hidden in block.items():
                    half = hidden.cpu().numpy().astype(PREFIX_DTYPE)
                    if not np.isfinite(half).all():
                        raise MsaError(f"{encoder.folder}: hidden states after layer {k} do not fit float16 (|x| > 65504); "
                                       f"set text_encoder.prefix_cache=false")
                    writers[k].append(split, half)
            for writer in writers.values():
                writer.finish(split, lengths)
        return {**found, **{k: writer.publish() for k, writer in writers.items()}}
    finally:
        for writer in writers.values():
            writer.discard()
