"""Tests for the data layer: `msa.platform.data.readers` and `msa.platform.data.features`.

Every test writes real files (npz archives, MMSA pickles, MIntRec folders) under ``tmp_path`` and
reads them back through `load_dataset`; nothing is mocked. The tests on the real CMU-MOSI subset
read ``../shared/data/mosi_lite.npz`` beside the repository and skip, saying why, without it.
"""
from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from msa.platform.core.errors import MsaError
from msa.platform.data.features import SPLITS, FeatureSet
from msa.platform.data.readers import MINTREC_INTENTS, infer_lengths, load_dataset, write_mmsa_pickle, write_npz
from msa.platform.data.synth import synthesize

MOSI_LITE = Path(__file__).resolve().parents[4] / "shared/data/mosi_lite.npz"

# Small hand-made datasets: rows per split, feature size and padded length per modality.
SIZES = {"train": 5, "valid": 3, "test": 4}
DIMS = {"text": 3, "audio": 2, "vision": 4}
MAX_T = {"text": 6, "audio": 5, "vision": 4}
ALL_MODALITIES = ("text", "audio", "vision")
SYNTH_SIZES = {"train": 24, "valid": 16, "test": 16}


# --------------------------------------------------------------------------------------------
# Helpers that build files
# --------------------------------------------------------------------------------------------


def padded(rng: np.random.Generator, lengths: np.ndarray, max_t: int, dim: int) -> np.ndarray:
    """``(N, max_t, dim)`` float32 whose first ``lengths[i]`` steps are non-zero, the rest zero."""
    out = np.zeros((len(lengths), max_t, dim), dtype=np.float32)
    for row, n in enumerate(lengths):
        signs = rng.choice([-1.0, 1.0], size=(n, dim))
        out[row, :n] = signs * rng.uniform(0.5, 1.5, size=(n, dim))
    return out


def make_split(
    rng: np.random.Generator, split: str, n: int, *, modalities=ALL_MODALITIES, task: str = "regression"
) -> dict[str, np.ndarray]:
    """One split in MMSA field names (``id``, ``text``, ``text_lengths``, ..., labels)."""
    fields: dict[str, np.ndarray] = {
        "id": np.asarray([f"{split}{i // 2:03d}$_${i % 2 + 1}" for i in range(n)]),
        "raw_text": np.asarray([f"{split} clip {i}" for i in range(n)]),
    }
    for m in modalities:
        lengths = rng.integers(1, MAX_T[m] + 1, size=n).astype(np.int64)
        lengths[0] = MAX_T[m]
        fields[m] = padded(rng, lengths, MAX_T[m], DIMS[m])
        fields[f"{m}_lengths"] = lengths
    if task == "regression":
        fields["regression_labels"] = rng.uniform(-3.0, 3.0, size=n).astype(np.float32)
    else:
        fields["classification_labels"] = np.arange(n, dtype=np.int64) % 3
    return fields


def make_splits(seed: int = 0, **kwargs: Any) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {s: make_split(rng, s, n, **kwargs) for s, n in SIZES.items()}


def save_npz(path: Path, splits: dict[str, dict], meta: dict | None = None) -> Path:
    """Write splits in the project's npz layout (``{split}_{field}``)."""
    arrays = {f"{s}_{key}": value for s, fields in splits.items() for key, value in fields.items()}
    if meta is not None:
        arrays["meta_json"] = np.asarray(json.dumps(meta))
    with path.open("wb") as handle:
        np.savez(handle, **arrays)
    return path


def save_pickle(path: Path, obj: Any) -> Path:
    with path.open("wb") as handle:
        pickle.dump(obj, handle, protocol=4)
    return path


def save_mmsa(path: Path, splits: dict[str, dict], **extra: Any) -> Path:
    """Write splits as an MMSA pickle: like MMSA's own files, it has no ``text_lengths``."""
    data: dict[str, Any] = {s: {k: v for k, v in f.items() if k != "text_lengths"} for s, f in splits.items()}
    data.update(extra)
    return save_pickle(path, data)


def assert_same_dataset(got: FeatureSet, want: FeatureSet) -> None:
    assert got.task == want.task
    assert got.metric_suite == want.metric_suite
    assert got.modalities == want.modalities
    assert got.class_names == want.class_names
    for s in SPLITS:
        a, b = got.splits[s], want.splits[s]
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert a.labels.dtype == b.labels.dtype
        np.testing.assert_array_equal(a.raw_text, b.raw_text)
        for m in want.modalities:
            assert a.features[m].dtype == np.float32
            np.testing.assert_array_equal(a.features[m], b.features[m])
            np.testing.assert_array_equal(a.lengths[m], b.lengths[m])


# --------------------------------------------------------------------------------------------
# 1. The real CMU-MOSI subset
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mosi_lite() -> FeatureSet:
    if not MOSI_LITE.is_file():
        pytest.skip(f"real data {MOSI_LITE} is absent (the shared data folder sits beside the repo)")
    return load_dataset(MOSI_LITE)


def test_mosi_lite_loads_as_text_audio_regression(mosi_lite: FeatureSet) -> None:
    assert mosi_lite.task == "regression"
    assert mosi_lite.metric_suite == "mosi"
    assert mosi_lite.modalities == ("text", "audio")
    expected_rows = {"train": 1284, "valid": 229, "test": 686}
    for s, n in expected_rows.items():
        split = mosi_lite.splits[s]
        assert split.features["text"].shape == (n, 32, 384)
        assert split.features["audio"].shape == (n, 1, 73)
        for m in ("text", "audio"):
            assert split.features[m].dtype == np.float32
            assert np.issubdtype(split.lengths[m].dtype, np.integer)
            assert split.lengths[m].shape == (n,)
        assert (split.lengths["audio"] == 1).all()
        assert split.ids.dtype.kind == "U" and len(split.ids) == n
        assert split.labels.shape == (n,)
        assert split.labels.min() >= -3.0 and split.labels.max() <= 3.0
        steps = np.arange(32)[None, :]
        padding = steps >= split.lengths["text"][:, None]
        assert not split.features["text"][padding].any(), f"{s}: text padding is not zero"


# --------------------------------------------------------------------------------------------
# 2. Round trips through our writers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", [write_npz, write_mmsa_pickle], ids=["npz", "mmsa_pickle"])
@pytest.mark.parametrize("task", ["regression", "classification"])
def test_round_trip_keeps_everything(tmp_path: Path, writer: Callable, task: str) -> None:
    original = synthesize(task, seed=0, sizes=SYNTH_SIZES)
    path = tmp_path / "synth.bin"
    writer(original, path)
    loaded = load_dataset(path)
    assert_same_dataset(loaded, original)
    if task == "classification":
        assert loaded.class_names == MINTREC_INTENTS
        assert loaded.spec.num_classes == 20


def test_mmsa_pickle_has_no_text_lengths_and_they_are_inferred(tmp_path: Path) -> None:
    original = synthesize("regression", seed=0, sizes=SYNTH_SIZES)
    path = tmp_path / "synth.pkl"
    write_mmsa_pickle(original, path)
    with path.open("rb") as handle:
        raw = pickle.load(handle)
    assert "text_lengths" not in raw["train"]
    loaded = load_dataset(path)
    for s in SPLITS:
        np.testing.assert_array_equal(loaded.splits[s].lengths["text"], original.splits[s].lengths["text"])


@pytest.mark.parametrize(("writer", "file_name"), [(write_mmsa_pickle, "again.pkl"), (write_npz, "again.npz")])
def test_sims_round_trip_keeps_suite_and_unimodal_labels(tmp_path: Path, writer, file_name) -> None:
    splits = make_splits(seed=3)
    for fields in splits.values():
        for key in ("regression_labels", "regression_labels_T", "regression_labels_A", "regression_labels_V"):
            fields[key] = np.linspace(-1.0, 1.0, len(fields["id"])).astype(np.float32)
    sims = load_dataset(save_mmsa(tmp_path / "sims.pkl", splits))
    writer(sims, tmp_path / file_name)
    again = load_dataset(tmp_path / file_name)
    assert again.metric_suite == "sims"
    for s in SPLITS:
        assert set(again.splits[s].unimodal_labels) == set(ALL_MODALITIES)
        for m in ALL_MODALITIES:
            np.testing.assert_array_equal(again.splits[s].unimodal_labels[m], sims.splits[s].unimodal_labels[m])


# --------------------------------------------------------------------------------------------
# 3. Any subset of modalities
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("modalities", [("text", "audio"), ("audio", "vision")], ids=["text+audio", "audio+vision"])
@pytest.mark.parametrize("fmt", ["npz", "mmsa_pickle"])
def test_any_subset_of_modalities_loads(tmp_path: Path, fmt: str, modalities: tuple[str, ...]) -> None:
    splits = make_splits(modalities=modalities)
    if fmt == "npz":
        path = save_npz(tmp_path / "subset.npz", splits)
    else:
        path = save_mmsa(tmp_path / "subset.pkl", splits)
    dataset = load_dataset(path)
    assert dataset.modalities == modalities
    assert set(dataset.spec.dims) == set(modalities)
    for s in SPLITS:
        assert set(dataset.splits[s].features) == set(modalities)
        for m in modalities:
            np.testing.assert_array_equal(dataset.splits[s].features[m], splits[s][m])
            np.testing.assert_array_equal(dataset.splits[s].lengths[m], splits[s][f"{m}_lengths"])


# --------------------------------------------------------------------------------------------
# 4. MMSA pickle variants
# --------------------------------------------------------------------------------------------


def test_aligned_pickle_infers_lengths_from_trailing_zero_rows(tmp_path: Path) -> None:
    splits = make_splits(seed=1)
    expected = {s: {m: f[f"{m}_lengths"].copy() for m in ALL_MODALITIES} for s, f in splits.items()}
    for fields in splits.values():
        for m in ALL_MODALITIES:
            del fields[f"{m}_lengths"]
    dataset = load_dataset(save_mmsa(tmp_path / "aligned_50.pkl", splits))
    for s in SPLITS:
        for m in ALL_MODALITIES:
            np.testing.assert_array_equal(dataset.splits[s].lengths[m], expected[s][m])


def test_text_bert_mask_gives_text_lengths(tmp_path: Path) -> None:
    splits = make_splits(seed=2)
    rng = np.random.default_rng(9)
    mask_lengths = {}
    for s, fields in splits.items():
        n, t = fields["text"].shape[:2]
        fields["text"] = rng.uniform(0.5, 1.5, size=fields["text"].shape).astype(np.float32)  # no zero padding
        lengths = rng.integers(1, t + 1, size=n)
        bert = np.zeros((n, 3, t), dtype=np.float32)
        bert[:, 0, :] = 101.0
        bert[:, 1, :] = np.arange(t)[None, :] < lengths[:, None]
        fields["text_bert"] = bert
        mask_lengths[s] = lengths
    dataset = load_dataset(save_mmsa(tmp_path / "unaligned_50.pkl", splits))
    for s in SPLITS:
        np.testing.assert_array_equal(dataset.splits[s].lengths["text"], mask_lengths[s])


def test_labels_shaped_n_by_1_are_flattened(tmp_path: Path) -> None:
    splits = make_splits(seed=4)
    flat = {s: f["regression_labels"].copy() for s, f in splits.items()}
    for fields in splits.values():
        fields["regression_labels"] = fields["regression_labels"][:, None]
    dataset = load_dataset(save_mmsa(tmp_path / "labels.pkl", splits))
    for s in SPLITS:
        assert dataset.splits[s].labels.shape == (SIZES[s],)
        np.testing.assert_array_equal(dataset.splits[s].labels, flat[s])


def sims_splits(seed: int = 5) -> dict[str, dict]:
    splits = make_splits(seed=seed)
    rng = np.random.default_rng(seed)
    for fields in splits.values():
        n = len(fields["id"])
        for key in ("regression_labels", "regression_labels_T", "regression_labels_A", "regression_labels_V"):
            fields[key] = rng.uniform(-1.0, 1.0, size=(n, 1)).astype(np.float32)
    return splits


def test_ch_sims_pickle_gives_sims_suite_and_unimodal_labels(tmp_path: Path) -> None:
    splits = sims_splits()
    dataset = load_dataset(save_mmsa(tmp_path / "unaligned_39.pkl", splits))
    assert dataset.task == "regression"
    assert dataset.metric_suite == "sims"
    for s in SPLITS:
        unimodal = dataset.splits[s].unimodal_labels
        assert set(unimodal) == {"text", "audio", "vision"}
        for m, suffix in (("text", "T"), ("audio", "A"), ("vision", "V")):
            np.testing.assert_array_equal(unimodal[m], splits[s][f"regression_labels_{suffix}"].reshape(-1))


@pytest.mark.parametrize("key", ["regression_labels", "regression_labels_A"])
def test_ch_sims_label_outside_minus1_1_is_an_error(tmp_path: Path, key: str) -> None:
    splits = sims_splits()
    splits["valid"][key][1] = 2.0
    with pytest.raises(MsaError, match=r"split 'valid.*labels: values out of range \[-1, 1\] for the sims scale"):
        load_dataset(save_mmsa(tmp_path / "unaligned_39.pkl", splits))


# --------------------------------------------------------------------------------------------
# 5. MIntRec folders
# --------------------------------------------------------------------------------------------

MINTREC_ROWS = {
    "train.tsv": [
        ("S01", "E01", "1", "Hi, how are you?", "Greet"),
        ("S01", "E01", "2", "Thanks a lot", "Thank"),
        ("S01", "E02", "7", "This is terrible", "Complain"),
    ],
    "dev.tsv": [
        ("S02", "E03", "4", "Could you help me?", "Ask for help"),
        ("S02", "E03", "5", "Bye now", "Leave"),
    ],
    "test.tsv": [
        ("S03", "E01", "1", "Great job!", "Praise"),
        ("S03", "E01", "2", "I'm so sorry", "Apologise"),
    ],
}
MINTREC_SPLITS = {"train": "train.tsv", "valid": "dev.tsv", "test": "test.tsv"}


def make_mintrec(root: Path, rows: dict[str, list[tuple[str, ...]]] = MINTREC_ROWS) -> tuple[Path, dict, dict]:
    """A MIntRec folder; returns it with the vision ``(T, 1, 8)`` and audio ``(T, 6)`` feature dicts."""
    rng = np.random.default_rng(7)
    folder = root / "MIntRec"
    (folder / "video_data").mkdir(parents=True)
    (folder / "audio_data").mkdir(parents=True)
    video, audio = {}, {}
    for file_name, split_rows in rows.items():
        lines = ["season\tepisode\tclip\ttext\tlabel"] + ["\t".join(row) for row in split_rows]
        (folder / file_name).write_text("\n".join(lines) + "\n")
        for index, row in enumerate(split_rows):
            clip = "_".join(row[:3])
            video[clip] = padded(rng, np.array([2 + index % 3]), 2 + index % 3, 8).reshape(-1, 1, 8)
            audio[clip] = padded(rng, np.array([3 + index % 4]), 3 + index % 4, 6)[0]
    save_pickle(folder / "video_data" / "video_feats.pkl", video)
    save_pickle(folder / "audio_data" / "audio_feats.pkl", audio)
    return folder, video, audio


def test_mintrec_folder_loads_padded_features_and_labels(tmp_path: Path) -> None:
    folder, video, audio = make_mintrec(tmp_path)
    dataset = load_dataset(folder)
    assert dataset.task == "classification"
    assert dataset.metric_suite == "classification"
    assert dataset.class_names == MINTREC_INTENTS and len(dataset.class_names) == 20
    assert set(dataset.modalities) == {"audio", "vision"}
    for s, file_name in MINTREC_SPLITS.items():
        split, rows = dataset.splits[s], MINTREC_ROWS[file_name]
        clips = ["_".join(row[:3]) for row in rows]
        assert list(split.ids) == clips
        assert list(split.raw_text) == [row[3] for row in rows]
        assert list(split.labels) == [MINTREC_INTENTS.index(row[4]) for row in rows]
        for m, source in (("vision", video), ("audio", audio)):
            features, lengths = split.features[m], split.lengths[m]
            assert features.dtype == np.float32
            sequences = [np.asarray(source[c]).reshape(len(source[c]), -1) for c in clips]
            assert features.shape == (len(clips), max(len(x) for x in sequences), sequences[0].shape[1])
            for row, seq in enumerate(sequences):
                assert lengths[row] == len(seq)
                np.testing.assert_array_equal(features[row, : len(seq)], seq)
                assert not features[row, len(seq):].any()


def test_mintrec_clip_missing_from_a_feature_file_is_an_error(tmp_path: Path) -> None:
    folder, _, audio = make_mintrec(tmp_path)
    del audio["S02_E03_5"]
    save_pickle(folder / "audio_data" / "audio_feats.pkl", audio)
    with pytest.raises(MsaError, match=r"audio_feats\.pkl: no features for clip 'S02_E03_5' of dev\.tsv"):
        load_dataset(folder)


def test_mintrec_unknown_intent_label_is_an_error(tmp_path: Path) -> None:
    rows = {**MINTREC_ROWS, "test.tsv": [*MINTREC_ROWS["test.tsv"], ("S03", "E01", "3", "La la", "Dance")]}
    folder, _, _ = make_mintrec(tmp_path, rows)
    with pytest.raises(MsaError, match=r"test\.tsv: unknown intent label 'Dance'"):
        load_dataset(folder)


def test_mintrec_empty_split_is_named(tmp_path: Path) -> None:
    folder, _, _ = make_mintrec(tmp_path, {**MINTREC_ROWS, "test.tsv": []})
    with pytest.raises(MsaError, match=r"test.*empty|empty.*test"):
        load_dataset(folder)


# --------------------------------------------------------------------------------------------
# 6. Bad inputs
# --------------------------------------------------------------------------------------------


def npz_with(change: Callable[[dict], None], meta: dict | None = None, **kwargs: Any) -> Callable[[Path], Path]:
    """A builder: the standard hand-made dataset, changed in place, written as npz."""
    def build(tmp_path: Path) -> Path:
        splits = make_splits(**kwargs)
        change(splits)
        return save_npz(tmp_path / "data.npz", splits, meta)
    return build


def mmsa_with(change: Callable[[dict], None], **kwargs: Any) -> Callable[[Path], Path]:
    """A builder: the standard hand-made dataset, changed in place, written as an MMSA pickle."""
    def build(tmp_path: Path) -> Path:
        splits = make_splits(**kwargs)
        change(splits)
        return save_mmsa(tmp_path / "data.pkl", splits, class_names=["neg", "neu", "pos"])
    return build


def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.npz"
    path.write_text("season,episode\n1,2\n")
    return path


def truncated_pickle(tmp_path: Path) -> Path:
    path = save_mmsa(tmp_path / "data.pkl", make_splits())
    path.write_bytes(path.read_bytes()[:200])
    return path


def truncated_npz(tmp_path: Path) -> Path:
    path = save_npz(tmp_path / "data.npz", make_splits())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def corrupt_member_npz(tmp_path: Path) -> Path:
    """A complete zip whose central directory is intact but one member's bytes are damaged."""
    path = save_npz(tmp_path / "data.npz", make_splits())
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("train_audio.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 128  # past the .npy header
    data[start : start + 16] = bytes(16)
    path.write_bytes(bytes(data))
    return path


def set_value(split: str, key: str, index: tuple, value: Any) -> Callable[[dict], None]:
    def change(splits: dict) -> None:
        splits[split][key][index] = value
    return change


def drop(split: str, key: str | None = None) -> Callable[[dict], None]:
    def change(splits: dict) -> None:
        if key is None:
            del splits[split]
        else:
            del splits[split][key]
    return change


def replace(split: str, key: str, make: Callable[[dict], Any]) -> Callable[[dict], None]:
    def change(splits: dict) -> None:
        splits[split][key] = make(splits[split])
    return change


def empty_split(split: str) -> Callable[[dict], None]:
    def change(splits: dict) -> None:
        splits[split] = {key: value[:0] for key, value in splits[split].items()}
    return change


CLASS_META = {"class_names": ["neg", "neu", "pos"]}

BAD_INPUTS = [
    pytest.param(lambda p: p / "absent.npz", r"data file not found: .*absent\.npz", id="missing-file"),
    pytest.param(text_file, r"notes\.npz: not an \.npz archive, an MMSA pickle or a MIntRec folder", id="text-file"),
    pytest.param(lambda p: p, r"not a MIntRec folder \(train\.tsv missing\)", id="empty-folder"),
    pytest.param(lambda p: save_pickle(p / "list.pkl", [1, 2, 3]), r"list\.pkl: pickle lacks the MMSA keys", id="pickle-of-list"),
    pytest.param(
        lambda p: save_pickle(p / "dict.pkl", {"features": np.zeros(3), "labels": np.zeros(3)}),
        r"dict\.pkl: pickle lacks the MMSA keys", id="pickle-without-mmsa-keys",
    ),
    pytest.param(truncated_pickle, r"data\.pkl: not a readable pickle", id="truncated-pickle"),
    pytest.param(npz_with(drop("valid")), r"data\.npz: split 'valid' is missing", id="npz-without-valid"),
    pytest.param(mmsa_with(drop("test")), r"data\.pkl: split 'test' is missing", id="pickle-without-test"),
    pytest.param(
        npz_with(replace("test", "audio", lambda f: np.ones(f["audio"].shape[:2] + (3,), np.float32))),
        r"split 'test', modality 'audio': feature dim 3 differs from train's 2", id="npz-audio-dim-differs",
    ),
    pytest.param(
        mmsa_with(replace("valid", "vision", lambda f: np.ones(f["vision"].shape[:2] + (7,), np.float32))),
        r"split 'valid', modality 'vision': feature dim 7 differs from train's 4", id="pickle-vision-dim-differs",
    ),
    pytest.param(
        npz_with(set_value("train", "audio", (1, 0, 0), np.nan)),
        r"split 'train', modality 'audio': 1 rows contain NaN or inf features", id="npz-nan-features",
    ),
    pytest.param(
        mmsa_with(set_value("test", "vision", (2, 0, 1), np.inf)),
        r"split 'test', modality 'vision': 1 rows contain NaN or inf features", id="pickle-inf-features",
    ),
    pytest.param(
        npz_with(set_value("valid", "text", (0, 0, 0), -np.inf)),
        r"split 'valid', modality 'text': 1 rows contain NaN or inf features", id="npz-minus-inf-features",
    ),
    pytest.param(
        npz_with(set_value("test", "regression_labels", (0,), 4.0)),
        r"split 'test' labels: values out of range \[-3, 3\] for the mosi scale", id="regression-label-4",
    ),
    pytest.param(
        npz_with(set_value("train", "regression_labels", (0,), np.nan)),
        r"split 'train' labels: NaN or inf labels", id="regression-label-nan",
    ),
    pytest.param(
        npz_with(set_value("valid", "classification_labels", (0,), 3), CLASS_META, task="classification"),
        r"split 'valid' labels: class ids must be integers in \[0, 2\]", id="class-label-equals-C",
    ),
    pytest.param(
        mmsa_with(set_value("train", "classification_labels", (1,), -1), task="classification"),
        r"split 'train' labels: class ids must be integers in \[0, 2\]", id="class-label-negative",
    ),
    pytest.param(
        npz_with(replace("test", "classification_labels", lambda f: np.full(len(f["id"]), 1.5)), CLASS_META,
                 task="classification"),
        r"split 'test' labels: class ids must be integers", id="class-label-fractional",
    ),
    pytest.param(
        npz_with(replace("train", "id", lambda f: np.asarray(["a", 1, None, 2.0, "b"], dtype=object))),
        r"key 'train_id' holds Python objects", id="npz-object-array",
    ),
    pytest.param(truncated_npz, r"data\.npz: not a readable \.npz archive", id="truncated-npz"),
    pytest.param(
        corrupt_member_npz, r"data\.npz", id="npz-corrupt-member",
    ),
    pytest.param(
        npz_with(set_value("valid", "audio_lengths", (1,), MAX_T["audio"] + 1)),
        r"split 'valid', modality 'audio': lengths must lie in \[0, 5\]", id="npz-length-over-T",
    ),
    pytest.param(
        mmsa_with(set_value("train", "vision_lengths", (0,), -1)),
        r"split 'train', modality 'vision': lengths must lie in \[0, 4\]", id="pickle-negative-length",
    ),
    pytest.param(
        npz_with(replace("test", "audio_lengths", lambda f: f["audio_lengths"][:-1])),
        r"split 'test', modality 'audio': lengths missing or not one per row", id="npz-lengths-short",
    ),
    pytest.param(npz_with(empty_split("valid")), r"split 'valid' is empty", id="npz-empty-split"),
    pytest.param(mmsa_with(empty_split("test")), r"split 'test' is empty", id="pickle-empty-split"),
    pytest.param(
        npz_with(drop("train", "regression_labels")),
        r"split 'train'.*no 'regression_labels' or 'classification_labels'", id="npz-no-labels",
    ),
    pytest.param(
        lambda p: save_npz(p / "data.npz", {"fold0": {"x": np.zeros(3)}}),
        r"no '<split>_id' keys", id="npz-without-id-keys",
    ),
]


@pytest.mark.parametrize(("build", "message"), BAD_INPUTS)
def test_bad_input_raises_msa_error_naming_the_problem(tmp_path: Path, build: Callable, message: str) -> None:
    path = build(tmp_path)
    with pytest.raises(MsaError, match=message) as caught:
        load_dataset(path)
    assert "\n" not in str(caught.value), "user-facing errors are one line"


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("fmt", ["npz", "mmsa_pickle"])
def test_replace_nonfinite_loads_zeros(tmp_path: Path, fmt: str, value: float) -> None:
    splits = make_splits()
    clean = splits["train"]["audio"].copy()
    splits["train"]["audio"][1, 0, 0] = value
    splits["train"]["audio"][2, 0, :] = value
    path = save_npz(tmp_path / "d.npz", splits) if fmt == "npz" else save_mmsa(tmp_path / "d.pkl", splits)
    with pytest.raises(MsaError, match="2 rows contain NaN or inf"):
        load_dataset(path)
    audio = load_dataset(path, replace_nonfinite=True).splits["train"].features["audio"]
    expected = clean.copy()
    expected[1, 0, 0] = 0.0
    expected[2, 0, :] = 0.0
    np.testing.assert_array_equal(audio, expected)


# --------------------------------------------------------------------------------------------
# 7. infer_lengths and sha256_path
# --------------------------------------------------------------------------------------------


def test_infer_lengths_counts_up_to_the_last_nonzero_step() -> None:
    features = np.zeros((5, 4, 2), dtype=np.float32)
    features[0, :2] = 1.0  # two real steps
    # row 1: all zeros -> 0
    features[2, 0] = 1.0
    features[2, 2] = 1.0  # a zero step in the middle must not cut the length
    features[3] = 0.5  # full
    features[4, 3] = [-1.0, 1.0]  # values that sum to zero still make a real step
    lengths = infer_lengths(features)
    np.testing.assert_array_equal(lengths, [2, 0, 3, 4, 4])
    assert np.issubdtype(lengths.dtype, np.integer)
