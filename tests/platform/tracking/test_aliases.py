"""The champion policy's decision (`aliases.decide`) on the standings registration tags give:
a version becomes champion only by beating the champion on valid, on the same data and metric."""
from __future__ import annotations

import pytest

from msa.platform.tracking.aliases import CHALLENGER, CHAMPION, Standing, dataset_of, decide

NAME = "msa-fine-mosi_lite"


def standing(version: str, score: float | None, *, metric: str = "mae", fingerprint: str = "a" * 64,
             dataset: str = "mosi_lite") -> Standing:
    return Standing(version=version, dataset=dataset, fingerprint=fingerprint, metric=metric, score=score)


def test_the_dataset_is_the_last_part_of_a_registered_name():
    assert dataset_of("msa-fine-mosi_lite") == "mosi_lite"
    assert dataset_of("msa-ensemble-mosi-lite") == "mosi-lite"
    assert dataset_of("bench") == ""


def test_the_first_version_is_champion_and_a_later_one_only_by_beating_it():
    assert decide(NAME, standing("1", 0.9), None)[0] == CHAMPION
    alias, reason = decide(NAME, standing("2", 0.95), standing("1", 0.9))
    assert alias == CHALLENGER and "does not beat" in reason and "0.95" in reason and "0.9 " in reason
    assert decide(NAME, standing("2", 0.9), standing("1", 0.9))[0] == CHALLENGER  # a tie does not beat it
    alias, reason = decide(NAME, standing("2", 0.85), standing("1", 0.9))
    assert alias == CHAMPION and "beats the champion" in reason and "lower is better" in reason


def test_a_higher_is_better_metric_and_undefined_scores():
    assert decide(NAME, standing("2", 80.0, metric="acc2"), standing("1", 75.0, metric="acc2"))[0] == CHAMPION
    assert decide(NAME, standing("2", 70.0, metric="acc2"), standing("1", 75.0, metric="acc2"))[0] == CHALLENGER
    assert decide(NAME, standing("2", None), standing("1", 0.9))[0] == CHALLENGER
    assert decide(NAME, standing("2", 0.9), standing("1", None))[0] == CHAMPION


@pytest.mark.parametrize(("new", "why"), [
    (standing("2", 0.1, fingerprint="b" * 64), "other data"),
    (standing("2", 0.1, metric="corr"), "selected on valid corr"),
])
def test_versions_of_other_data_or_another_metric_are_not_compared(new, why):
    alias, reason = decide(NAME, new, standing("1", 0.9))
    assert alias == CHALLENGER and reason.startswith("not compared") and why in reason


def test_a_model_of_another_dataset_is_never_champion():
    alias, reason = decide(NAME, standing("1", 0.1, dataset="sims"), None)
    assert alias == CHALLENGER and "model of dataset sims" in reason
