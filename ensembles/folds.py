"""Folds grouped by video: the clips of one video never straddle two folds.

Clips cut from one video share its speaker, recording and topic, so a fold split by clip lets a
meta-learner see the "same" sample on both sides and flatters its estimate. The video id is parsed
from the clip id: MMSA's ``video$_$clip`` (MOSI, MOSEI, SIMS pickles) or ``videoid_clipno``
(the part before the last ``_``, as in the project's .npz files); an id with neither is its own
video.

Example:
    >>> video_id("03bSnISJMiM$_$11"), video_id("03bSnISJMiM_11"), video_id("clip7")
    ('03bSnISJMiM', '03bSnISJMiM', 'clip7')
"""
from __future__ import annotations

import numpy as np

from msa.platform.core.errors import MsaError

MMSA_SEPARATOR = "$_$"


def video_id(clip_id: str) -> str:
    """The video a clip was cut from (see the module docstring)."""
    if MMSA_SEPARATOR in clip_id:
        return clip_id.split(MMSA_SEPARATOR, 1)[0]
    head, separator, _ = clip_id.rpartition("_")
    return head if separator and head else clip_id


def grouped_folds(ids: tuple[str, ...] | list[str], k: int, *, seed: int = 0) -> np.ndarray:
    """Fold number (0..k-1) per clip, whole videos per fold, folds as even in clips as possible.

    Videos are shuffled with `seed`, then each goes, largest first, to the fold with the fewest
    clips so far (ties: lowest fold number), so the assignment is deterministic.

    Raises:
        MsaError: k < 2, or fewer videos than folds.
    """
    videos = [video_id(str(clip)) for clip in ids]
    unique = sorted(set(videos))
    if k < 2:
        raise MsaError(f"folds must be >= 2, got {k}")
    if len(unique) < k:
        raise MsaError(f"{k} folds need at least {k} videos, but the {len(ids)} clips come from {len(unique)}; lower the folds")
    order = np.random.default_rng(seed).permutation(len(unique))
    sizes = {video: 0 for video in unique}
    for video in videos:
        sizes[video] += 1
    fold_of: dict[str, int] = {}
    load = np.zeros(k, dtype=np.int64)
    # Stable sort: equal-sized videos keep their shuffled order.
    for position in sorted(order, key=lambda i: -sizes[unique[i]]):
        fold = int(np.argmin(load))
        fold_of[unique[position]] = fold
        load[fold] += sizes[unique[position]]
    return np.asarray([fold_of[video] for video in videos], dtype=np.int64)
