"""A deterministic synthetic dataset in the MMSA schema, with signal split across modalities.

Each clip has one latent factor per modality, visible only in that modality's sequence (a fixed
direction scaled by the factor, plus noise on every real step and a distractor direction). The
label needs all of them, so a model that fuses beats any single modality:

* regression: ``y = clip(1.1 s_text + 0.8 s_audio + 0.6 s_vision + noise, -3, 3)``;
* classification (20 classes, MIntRec-style): class ``4 * i_text + i_audio``; text shows one of 5
  prototypes, audio one of 4, vision a weak, noisy copy of the class prototype.

Each clip also has a transcript (``raw_text``) for text encoders: filler words around words
that carry the text factor (regression: a sentiment word from the factor's band, one band off
now and then; classification: a topic word of the text prototype), so an encoder trained on the
words learns what the text features show.

The same seed gives byte-identical arrays. Ids are MMSA style ``synthVVV$_$C`` with several clips
per video, so grouped folds can be tested.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from msa.platform.data.features import SPLITS, DatasetRecord, FeatureSet, Split
from msa.platform.data.readers import MINTREC_INTENTS, mmsa_pickle_sha256

DEFAULT_SIZES = {"train": 600, "valid": 200, "test": 200}
DEFAULT_DIMS = {"text": 32, "audio": 12, "vision": 16}
DEFAULT_MAX_LENGTHS = {"text": 20, "audio": 30, "vision": 30}
DEFAULT_WORDS = (3, 7)
REGRESSION_WEIGHTS = {"text": 1.1, "audio": 0.8, "vision": 0.6}
CLIPS_PER_VIDEO = 8
CHUNK_ROWS = 1024
FILLER_WORDS = ("the", "movie", "was", "really", "quite", "a", "film", "and", "story", "it", "i", "think", "so", "plot")
SENTIMENT_BANDS = (("awful", "terrible", "horrible"), ("bad", "boring", "weak"), ("okay", "fine", "average"),
                   ("good", "nice", "enjoyable"), ("great", "amazing", "wonderful"))
BAND_EDGES = (-1.2, -0.4, 0.4, 1.2)
TOPIC_WORDS = (("price", "cost"), ("food", "dinner"), ("work", "office"), ("family", "home"), ("trip", "travel"))


def _sequences(
    rng: np.random.Generator, code: np.ndarray, max_length: int, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    """Padded ``(N, T, d)`` sequences whose real steps are `code` ``(N, d)`` plus noise, made
    `CHUNK_ROWS` rows at a time (the same draws, in the same order, as one call would make), so
    CMU-MOSEI-sized sets need no more than their float32 result in memory."""
    n, dim = code.shape
    lengths = rng.integers(max(2, max_length // 3), max_length + 1, size=n)
    distractor = rng.normal(size=(n, 1)) * rng.normal(size=(1, dim)) / np.sqrt(dim)
    out = np.empty((n, max_length, dim), dtype=np.float32)
    for start in range(0, n, CHUNK_ROWS):
        rows = slice(start, min(start + CHUNK_ROWS, n))
        steps = code[rows, None, :] + distractor[rows, None, :] + noise * rng.normal(size=(rows.stop - start, max_length, dim))
        mask = np.arange(max_length)[None, :] < lengths[rows, None]
        out[rows] = steps * mask[:, :, None]
    return out, lengths.astype(np.int64)


def _unit_directions(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    directions = rng.normal(size=(count, dim))
    return directions / np.linalg.norm(directions, axis=1, keepdims=True)


def synthesize(
    task: str = "regression",
    *,
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    dims: dict[str, int] | None = None,
    max_lengths: dict[str, int] | None = None,
    words: tuple[int, int] = DEFAULT_WORDS,
) -> FeatureSet:
    """Generate the synthetic dataset.

    Args:
        task: ``"regression"`` (labels in [-3, 3]) or ``"classification"`` (20 classes).
        seed: the only source of randomness.
        sizes: rows per split (default 600/200/200).
        dims: feature size per modality (default text 32, audio 12, vision 16).
        max_lengths: padded length per modality (default text 20, audio 30, vision 30).
        words: filler words per transcript, lowest and highest (default 3 to 7; CMU-MOSEI's
            utterances run to about 8-40 words).

    Example:
        >>> synthesize("classification", seed=1).spec.num_classes
        20
    """
    sizes = sizes or DEFAULT_SIZES
    dims = dims or DEFAULT_DIMS
    max_lengths = max_lengths or DEFAULT_MAX_LENGTHS
    rng = np.random.default_rng(seed)
    text_rng = np.random.default_rng([seed, 1])  # its own stream: the features do not depend on the words
    # Directions are drawn once so that every split shares them.
    directions = {m: _unit_directions(rng, 20, d) * 2.0 for m, d in dims.items()}
    splits, offset = {}, 0
    for split_name in SPLITS:
        n = sizes[split_name]
        codes, labels, text_factor = _latent_codes(rng, task, n, dims, directions)
        features, lengths = {}, {}
        for m in dims:
            features[m], lengths[m] = _sequences(rng, codes[m], max_lengths[m], noise=1.0)
        videos = offset + np.arange(n) // CLIPS_PER_VIDEO
        ids = np.asarray([f"synth{v:04d}$_${i % CLIPS_PER_VIDEO + 1}" for i, v in enumerate(videos)])
        offset = videos[-1] + 1
        splits[split_name] = Split(
            ids=ids, features=features, lengths=lengths, labels=labels,
            raw_text=_transcripts(text_rng, task, text_factor, words),
        )
    suite = "mosi" if task == "regression" else "classification"
    dataset = FeatureSet(record=DatasetRecord(name=f"synth_{task}", path="", sha256="", task=task, metric_suite=suite),
                         splits=splits, class_names=MINTREC_INTENTS if task == "classification" else ())
    record = dataclasses.replace(dataset.record, sha256=mmsa_pickle_sha256(dataset))
    return dataclasses.replace(dataset, record=record, validate=False)


def _transcripts(rng: np.random.Generator, task: str, text_factor: np.ndarray, words: tuple[int, int]) -> np.ndarray:
    """One transcript per clip: `words` (lowest, highest) filler words with 1-2 words that carry `text_factor`."""
    texts = []
    for value in text_factor:
        if task == "regression":
            band = int(np.clip(np.searchsorted(BAND_EDGES, value) + rng.choice([-1, 0, 0, 0, 1]), 0, 4))
            carriers = SENTIMENT_BANDS[band]
        else:
            carriers = TOPIC_WORDS[int(value)]
        chosen = list(rng.choice(FILLER_WORDS, size=rng.integers(words[0], words[1] + 1)))
        for _ in range(rng.integers(1, 3)):
            chosen.insert(int(rng.integers(0, len(chosen) + 1)), str(rng.choice(carriers)))
        texts.append(" ".join(chosen))
    return np.asarray(texts)


def vocabulary() -> list[str]:
    """Every word the transcripts use (a test's tiny tokenizer is built from it)."""
    words = {*FILLER_WORDS, *(w for band in SENTIMENT_BANDS for w in band), *(w for t in TOPIC_WORDS for w in t)}
    return sorted(words)


def _latent_codes(rng, task, n, dims, directions):
    """Per-modality ``(N, d)`` codes, the labels they jointly determine, and the text factor
    (regression: its score; classification: its prototype) the transcripts carry."""
    if task == "regression":
        factors = {m: rng.normal(size=n) for m in dims}
        score = sum(REGRESSION_WEIGHTS.get(m, 0.7) * f for m, f in factors.items())
        labels = np.clip(score + 0.25 * rng.normal(size=n), -3.0, 3.0).astype(np.float32)
        codes = {m: factors[m][:, None] * directions[m][0] for m in dims}
        return codes, labels, factors.get("text", np.zeros(n))
    if task == "classification":
        text_part, audio_part = rng.integers(0, 5, size=n), rng.integers(0, 4, size=n)
        labels = (4 * text_part + audio_part).astype(np.int64)
        parts = {"text": text_part, "audio": audio_part, "vision": labels}
        strength = {"text": 1.0, "audio": 1.0, "vision": 0.35}
        codes = {m: strength[m] * directions[m][parts[m]] for m in dims}
        return codes, labels, text_part
    raise ValueError(f"unknown task {task!r}")
