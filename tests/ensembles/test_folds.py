"""Video ids parsed from clip ids, and folds that keep every video's clips together."""
from __future__ import annotations

import numpy as np
import pytest

from msa.ensembles.folds import grouped_folds, video_id
from msa.platform.core.errors import MsaError


@pytest.mark.parametrize("clip, video", [
    ("03bSnISJMiM$_$11", "03bSnISJMiM"),       # MMSA pickles
    ("video_with_underscores$_$2", "video_with_underscores"),
    ("03bSnISJMiM_11", "03bSnISJMiM"),         # mosi_lite.npz: videoid_clipno
    ("a_b_c_3", "a_b_c"),
    ("clip7", "clip7"),                        # no separator: its own video
    ("_5", "_5"),
])
def test_video_id(clip, video):
    assert video_id(clip) == video


def test_grouped_folds_keep_videos_whole_balance_clips_and_are_deterministic():
    rng = np.random.default_rng(3)
    ids = [f"vid{v:03d}_{c}" for v in range(40) for c in range(int(rng.integers(1, 9)))]
    folds = grouped_folds(ids, 5, seed=0)
    assert sorted(set(folds.tolist())) == [0, 1, 2, 3, 4]
    for video in {video_id(i) for i in ids}:
        assert len({int(f) for i, f in zip(ids, folds) if video_id(i) == video}) == 1
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 8  # at most one video's worth of clips apart
    assert np.array_equal(folds, grouped_folds(ids, 5, seed=0))
    assert not np.array_equal(folds, grouped_folds(ids, 5, seed=1))


def test_real_mosi_ids_group_by_video(mosi_lite_path):
    with np.load(mosi_lite_path, allow_pickle=False) as data:
        ids = [str(i) for i in data["valid_id"]]
    folds = grouped_folds(ids, 5)
    videos = {}
    for clip, fold in zip(ids, folds):
        videos.setdefault(video_id(clip), set()).add(int(fold))
    assert len(videos) < len(ids)  # several clips per video: grouping matters here
    assert all(len(f) == 1 for f in videos.values())


def test_too_few_videos_or_folds_are_refused():
    with pytest.raises(MsaError, match="3 folds need at least 3 videos"):
        grouped_folds(["a_1", "a_2", "b_1"], 3)
    with pytest.raises(MsaError, match="folds must be >= 2"):
        grouped_folds(["a_1", "b_1"], 1)
