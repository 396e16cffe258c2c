"""Retraining a member's configuration: the seed ensemble and the out-of-fold protocol.

Both run `train_loop` in this process (one DeepSpeed rank, as `msa train` does), one run after
another, each into its own checkpoint folder under the ensemble's output folder. A folder that
already holds a finished run of the same configuration is reused, so running `msa ensemble` again
retrains nothing.

* Seed ensemble: the best single model's configuration trained again with more seeds (early
  stopping on valid, exactly as in the sweep), beside the seed or seeds it was trained with; the average of the seeds is the baseline a
  stacked ensemble has to beat, since it costs the same and needs no search over members.
* Out-of-fold: train and valid are pooled and cut into K folds grouped by video; fold j's model
  trains on the other folds for the member's selected number of epochs and keeps its last epoch
  (nothing is chosen on the held-out fold), then predicts fold j and test. Every pooled clip gets
  one out-of-fold prediction, and a member's test prediction is its K fold models' average.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from msa.ensembles.folds import grouped_folds
from msa.ensembles.members import Candidate, DatasetCache, Member, candidate_from_folder, load_member
from msa.platform.data.features import FeatureSet, Split
from msa.platform.training.checkpoint import Checkpoint, SeedGroup
from msa.platform.training.loop import train_loop


def training_config(folder: Path) -> dict:
    """The resolved train config a checkpoint folder records (without its data description); a
    seed group's first seed's."""
    return SeedGroup(folder).first.train_config()


def retrain(source: Path, dataset: FeatureSet, out: Path, *, seed: int, epochs: int | None = None) -> Path:
    """Train `source`'s configuration again into `out` with `seed`; with `epochs`, train exactly
    that many and keep the last. Reuses `out` when it already holds that very run. A fault the
    sweep injected into its trials (``inject_fault``, to test their retries) is not carried over:
    nothing retries a retraining."""
    config = {**training_config(source), "seed": seed, "out": str(out), "inject_fault": "none"}
    if epochs is not None:
        config["epochs"] = epochs
    if Checkpoint(out).exists() and training_config(out) == config:
        return out
    if out.exists():  # an interrupted or different run of ours: start it over
        shutil.rmtree(out)
    train_loop(config, dataset=dataset, keep_last_epoch=epochs is not None)
    return out


def seed_members(best: Member, dataset: FeatureSet, folder: Path, seeds: int, datasets: DatasetCache) -> list[Member]:
    """The best single model's own seeds (one, or its seed group's) and `seeds - 1` retrainings
    of its configuration with the next seeds."""
    own = best.seeds or [best]
    last_seed = max(int(training_config(member.candidate.folder)["seed"]) for member in own)
    members = list(own)
    for seed in range(last_seed + 1, last_seed + seeds):
        out = retrain(own[0].candidate.folder, dataset, folder / f"seed{seed}", seed=seed)
        members.append(load_member(candidate_from_folder(out, best.candidate.pair, f"{best.candidate.trial_id}-seed{seed}"),
                                   datasets))
    return members


def take(split: Split, rows: np.ndarray) -> Split:
    """The given rows of a split."""
    return Split(ids=split.ids[rows], features={m: a[rows] for m, a in split.features.items()},
                 lengths={m: n[rows] for m, n in split.lengths.items()}, labels=split.labels[rows],
                 unimodal_labels={m: y[rows] for m, y in split.unimodal_labels.items()},
                 raw_text=None if split.raw_text is None else split.raw_text[rows],
                 text_bert=None if split.text_bert is None else split.text_bert[rows])


def pooled(first: Split, second: Split) -> Split:
    """Two splits as one (features padded to the longer of their sequence lengths)."""
    def stack(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        steps = max(a.shape[1], b.shape[1])
        pad = lambda x: np.pad(x, ((0, 0), (0, steps - x.shape[1]), (0, 0)))  # noqa: E731
        return np.concatenate([pad(a), pad(b)])

    both_text = first.raw_text is not None and second.raw_text is not None
    both_bert = (first.text_bert is not None and second.text_bert is not None
                 and first.text_bert.shape[2] == second.text_bert.shape[2])
    return Split(
        ids=np.concatenate([first.ids, second.ids]),
        features={m: stack(first.features[m], second.features[m]) for m in first.features},
        lengths={m: np.concatenate([first.lengths[m], second.lengths[m]]) for m in first.lengths},
        labels=np.concatenate([first.labels, second.labels]),
        unimodal_labels={m: np.concatenate([first.unimodal_labels[m], second.unimodal_labels[m]])
                         for m in first.unimodal_labels if m in second.unimodal_labels},
        raw_text=np.concatenate([first.raw_text, second.raw_text]) if both_text else None,
        text_bert=np.concatenate([first.text_bert, second.text_bert]) if both_bert else None,
    )


def pool_folds(dataset: FeatureSet, k: int, seed: int) -> tuple[Split, np.ndarray]:
    """Train and valid pooled, and a fold number per pooled clip (grouped by video)."""
    pool = pooled(dataset.splits["train"], dataset.splits["valid"])
    return pool, grouped_folds([str(i) for i in pool.ids], k, seed=seed)


def out_of_fold_members(candidate: Candidate, dataset: FeatureSet, pool: Split, folds: np.ndarray, folder: Path,
                        datasets: DatasetCache) -> list[Member]:
    """One member per fold: trained on the other folds for `candidate`'s best epoch count; its
    "valid" split is the held-out fold (predicted, never used to choose)."""
    members = []
    seed = int(training_config(candidate.folder)["seed"])
    for fold in range(int(folds.max()) + 1):
        fold_data = FeatureSet(
            record=dataset.record, class_names=dataset.class_names,
            splits={"train": take(pool, np.flatnonzero(folds != fold)), "valid": take(pool, np.flatnonzero(folds == fold)),
                    "test": dataset.splits["test"]},
        )
        out = retrain(candidate.folder, fold_data, folder / f"fold{fold}", seed=seed, epochs=max(candidate.best_epoch, 1))
        members.append(load_member(candidate_from_folder(out, candidate.pair, f"{candidate.trial_id}-fold{fold}"), datasets))
    return members
