"""The champion policy: the champion as a function of all versions' standings (`champion_of`,
`reason_for`: the best on valid among versions of the same data and metric, a promotion by hand
standing until a later version beats it), then real sweeps on real Ray registering into one MLflow server one after another
(a first, a weaker, a stronger, one on other data), `msa registry --dataset` ranking them and
`msa registry promote` moving champion by hand, and refusing bad promotions."""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from helpers import sweep_config, synth_data

from msa.platform.cli import main
from msa.platform.data.readers import write_npz
from msa.platform.data.synth import synthesize
from msa.platform.sweep.driver import run_sweep
from msa.platform.tracking.aliases import (CHALLENGER, CHAMPION, REASON_TAG, REPLACED_TAG, Standing, champion_of, dataset_of,
                                           reason_for, standings)
from msa.platform.tracking.registry import register_checkpoint

NAME = "msa-fine-mosi_lite"
FINGERPRINT = "f" * 64


def standing(version: str, score: float | None, *, metric: str = "mae", fingerprint: str = FINGERPRINT,
             dataset: str = "mosi_lite", **promotion) -> Standing:
    return Standing(version=version, dataset=dataset, fingerprint=fingerprint, metric=metric, score=score, **promotion)


def winner(*listed: Standing) -> str:
    return champion_of(NAME, list(listed)).version


def test_the_dataset_is_the_last_part_of_a_registered_name():
    assert dataset_of("msa-fine-mosi_lite") == "mosi_lite"
    assert dataset_of("msa-ensemble-mosi-lite") == "mosi-lite"
    assert dataset_of("bench") == ""


def test_the_first_version_is_champion_and_a_later_one_only_by_beating_it():
    first = standing("1", 0.9)
    assert winner(first) == "1" and reason_for(NAME, first, [first]) == f"no champion of {NAME} to beat"
    weaker = standing("2", 0.95)
    assert winner(first, weaker) == "1"
    reason = reason_for(NAME, weaker, [first, weaker])
    assert reason == "does not beat the champion: valid mae 0.95 against 0.9 of champion version 1 (lower is better)"
    assert winner(first, standing("2", 0.9)) == "1"  # a tie does not beat it
    stronger = standing("2", 0.85)
    assert winner(first, stronger) == "2"
    assert reason_for(NAME, stronger, [first, stronger]).startswith("beats the champion: valid mae 0.85 against 0.9 of")


def test_a_higher_is_better_metric_and_undefined_scores():
    assert winner(standing("1", 75.0, metric="acc2"), standing("2", 80.0, metric="acc2")) == "2"
    assert winner(standing("1", 75.0, metric="acc2"), standing("2", 70.0, metric="acc2")) == "1"
    assert winner(standing("1", 0.9), standing("2", None)) == "1"
    assert winner(standing("1", None), standing("2", 0.9)) == "2"


@pytest.mark.parametrize(("new", "why"), [
    (standing("2", 0.1, fingerprint="b" * 64), "other data"),
    (standing("2", 0.1, metric="corr"), "selected on valid corr"),
])
def test_versions_of_other_data_or_another_metric_are_not_compared(new, why):
    listed = [standing("1", 0.9), new]
    reason = reason_for(NAME, new, listed)
    assert winner(*listed) == "1" and reason.startswith("not compared with champion version 1") and why in reason


def test_a_model_of_another_dataset_is_never_champion():
    foreign = standing("1", 0.1, dataset="sims")
    assert champion_of(NAME, [foreign]) is None
    assert reason_for(NAME, foreign, [foreign]) == f"never champion: it is a model of dataset sims, registered under {NAME}"


def test_the_champion_is_the_same_whatever_order_the_versions_are_listed_in():
    rng = random.Random(0)
    listed = [standing(str(n), round(rng.uniform(0.7, 0.9), 2)) for n in range(1, 30)]
    expected = min(listed, key=lambda s: (s.score, s.number)).version
    for _ in range(20):
        rng.shuffle(listed)
        assert winner(*listed) == expected


def test_a_promotion_stands_until_a_version_registered_after_it_beats_it():
    best, promoted = standing("2", 0.80), standing("3", 0.90, promotion=1, promoted_over=4)
    before = [standing("1", 0.85), best, promoted, standing("4", 0.82)]
    assert winner(*before) == "3"  # versions 1, 2 and 4 beat it but were there when it was promoted
    assert "version 3 was promoted by hand over every version up to 4" in reason_for(NAME, before[0], before)
    weaker = standing("5", 0.95)
    assert winner(*before, weaker) == "3"
    assert reason_for(NAME, weaker, [*before, weaker]).startswith("does not beat the champion: valid mae 0.95 against 0.9 ")
    assert winner(*before, weaker, standing("6", 0.89)) == "6"
    # the last promotion counts, and promoting a version of other data moves the line to that data
    other = standing("7", 0.99, fingerprint="b" * 64, promotion=2, promoted_over=7)
    assert winner(*before, weaker, other, standing("8", 0.5)) == "7"
    assert winner(*before, weaker, other, standing("8", 0.5, fingerprint="b" * 64)) == "8"


def test_a_promotion_recorded_before_promoted_over_existed_counts_the_versions_created_by_its_time():
    def version(number: int, created_s: int, score: float, **tags) -> SimpleNamespace:
        return SimpleNamespace(version=str(number), creation_timestamp=created_s * 1000, tags={
            "dataset": "mosi_lite", "dataset_fingerprint": FINGERPRINT, "selection_metric": "mae",
            "valid_mae": str(score), **tags})

    promoted_at = 1_700_000_100  # 2023-11-14T22:15:00Z
    listed = standings(NAME, [version(1, 1_700_000_000, 0.9, **{"msa.promoted_at": "2023-11-14T22:15:00Z"}),
                              version(2, 1_700_000_050, 0.8), version(3, promoted_at + 60, 0.85)])
    assert [s.promoted_over for s in listed] == [2, 0, 0]
    assert champion_of(NAME, listed).version == "3"  # 2 was there when 1 was promoted; 3 came later and beats 1


NAMED = "msa-baseline-aliased"
# (learning rate, epochs) of each sweep's one trial: the first, a weaker and a stronger one
TRAINING = {"first": (1e-3, 2), "weaker": (1e-6, 1), "stronger": (3e-3, 6)}


def one_trial_sweep(root: Path, label: str, uri: str, *, dataset: str) -> Path:
    """A sweep of one baseline trial with a fixed config, logging and registering at `uri` (sweeps
    of their own: the order in which sweeps register is what these tests are about)."""
    lr, epochs = TRAINING.get(label, TRAINING["first"])
    space = root / f"{label}-space.yaml"
    space.write_text(yaml.safe_dump({"lr": {"type": "fixed", "value": lr}, "model_config.hidden": {"type": "fixed", "value": 32},
                                     "weight_decay": {"type": "float", "low": 0.0, "high": 1e-6}}))  # one to search
    config = sweep_config(root, name=label, datasets=[dataset], budget={"max_epochs": epochs}, train={"patience": 10},
                          search={"sampler": "random", "spaces": {"baseline": str(space)}}, tracking={"uri": uri})
    (row,) = run_sweep(config).pairs
    return Path(row.best_checkpoint)


def aliases_of(mlflow_client, name: str = NAMED) -> dict[str, str]:
    return {alias: str(version) for alias, version in mlflow_client.get_registered_model(name).aliases.items()}


def registry_state(mlflow_client) -> dict:
    """Every version's tags and the aliases of every msa-* name: what a refused promote must not change."""
    names = [model.name for model in mlflow_client.search_registered_models()]
    return {name: (aliases_of(mlflow_client, name),
                   {v.version: dict(v.tags) for v in mlflow_client.search_model_versions(f"name = '{name}'")})
            for name in names}


@pytest.fixture(scope="module")
def registry(ray_runtime, mlflow_client, tmp_path_factory):
    """Four sweeps registering into the session's server, one after another, with the aliases
    after each; then a fifth version: a checkpoint of the same name registered as a model of
    another dataset. Their dataset is `aliased` (the built-in regression set), so the name
    msa-baseline-aliased is theirs alone on the server."""
    root = tmp_path_factory.mktemp("champion")
    data = synth_data(root, "aliased")
    other_data = root / "other" / "aliased.npz"  # same name, other clips: another fingerprint
    other_data.parent.mkdir()
    other = synthesize("regression", seed=7, sizes={"train": 64, "valid": 24, "test": 24})
    write_npz(dataclasses.replace(other, record=dataclasses.replace(other.record, name="aliased"), validate=False),
              other_data)
    uri = mlflow_client.tracking_uri
    after, checkpoints = {}, {}
    for label, dataset in (("first", data), ("weaker", data), ("stronger", data), ("other-data", other_data)):
        checkpoints[label] = one_trial_sweep(root, label, uri, dataset=str(dataset))
        after[label] = aliases_of(mlflow_client)
    first = mlflow_client.get_model_version(NAMED, "1")
    by_hand = mlflow_client.create_run(mlflow_client.get_run(first.run_id).info.experiment_id).info.run_id
    scores = {key: value for key, value in first.tags.items() if not key.startswith("msa.")}
    foreign = register_checkpoint(uri, by_hand, checkpoints["first"], NAMED, {**scores, "dataset": "mosi_lite"})
    return {"uri": uri, "client": mlflow_client, "after": after, "foreign": foreign}


def test_a_weaker_sweep_becomes_challenger_and_a_stronger_one_takes_champion(registry):
    mlflow_client, after = registry["client"], registry["after"]
    versions = {v.version: v for v in mlflow_client.search_model_versions(f"name = '{NAMED}'")}
    score = {number: float(versions[number].tags["valid_mae"]) for number in ("1", "2", "3")}
    assert score["2"] > score["1"] > score["3"], score  # the sweeps' configs are weaker and stronger as meant

    assert after["first"] == {CHAMPION: "1"}
    assert versions["1"].tags[REASON_TAG] == f"no champion of {NAMED} to beat"
    assert after["weaker"] == {CHAMPION: "1", CHALLENGER: "2"}
    assert versions["2"].tags[REASON_TAG] == (f"does not beat the champion: valid mae {score['2']:.6g} against "
                                              f"{score['1']:.6g} of champion version 1 (lower is better)")
    assert after["stronger"] == {CHAMPION: "3", CHALLENGER: "2"}
    assert versions["3"].tags[REASON_TAG].startswith(f"beats the champion: valid mae {score['3']:.6g} against")
    assert versions["1"].tags[REPLACED_TAG].startswith("version 3: beats the champion")
    # each version's tags name its sweep and data
    assert {versions[n].tags["msa.sweep"].split("-")[0] for n in ("1", "2", "3")} == {"first", "weaker", "stronger"}
    assert len({versions[n].tags["dataset_fingerprint"] for n in ("1", "2", "3")}) == 1


def test_versions_of_other_data_or_another_dataset_are_challengers_never_compared(registry):
    mlflow_client, after = registry["client"], registry["after"]
    other = mlflow_client.get_model_version(NAMED, "4")
    assert after["other-data"] == {CHAMPION: "3", CHALLENGER: "4"}
    assert other.tags[REASON_TAG].startswith("not compared with champion version 3: it was trained on other data")
    foreign = registry["foreign"]
    assert (foreign.version, foreign.alias) == ("5", CHALLENGER)
    assert foreign.reason == f"never champion: it is a model of dataset mosi_lite, registered under {NAMED}"


def ranking_tables(out: str) -> list[list[list[str]]]:
    """`msa registry --dataset` output as tables (a title line, a header, rows), rows split on spaces."""
    tables = []
    for line in out.splitlines():
        if " ranked on valid " in line:
            tables.append([])
        elif tables and line.split() and line.split()[0].isdigit():
            tables[-1].append(line.split())
    return tables


def test_msa_registry_dataset_ranks_the_versions_of_every_sweep_on_valid(registry, capsys):
    assert main(["registry", "--dataset", "aliased", "--tracking-uri", registry["uri"]]) == 0
    out = capsys.readouterr().out
    newest, older = ranking_tables(out)
    assert [row[2] for row in newest] == ["4"]  # the other data's table first: it holds the newest version
    ranked = [row[2] for row in older]
    assert ranked == ["3", "1", "2"]  # stronger, first, weaker: by valid MAE, lower first
    assert "beats the champion" in out and "does not beat the champion" in out and "no champion of" in out

    assert main(["registry", "--dataset", "mosi_lite", "--tracking-uri", registry["uri"]]) == 0
    (foreign,) = ranking_tables(capsys.readouterr().out)
    assert [row[2] for row in foreign] == ["5"]

    assert main(["registry", "--dataset", "no_such_data", "--tracking-uri", registry["uri"]]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    head = f"msa: error: no registered model of dataset 'no_such_data' at {registry['uri']} (datasets: "
    assert err.startswith(head) and err.endswith(")")
    listed = err.removeprefix(head).removesuffix(")").split(", ")  # every dataset the (shared) server holds
    assert listed == sorted(listed) and {"aliased", "mosi_lite"} <= set(listed)


def test_bad_promotions_are_one_line_errors_and_change_nothing(registry, capsys):
    mlflow_client, uri = registry["client"], registry["uri"]
    before = registry_state(mlflow_client)
    champion = mlflow_client.get_model_version_by_alias(NAMED, CHAMPION)
    other_data = next(v.version for v in mlflow_client.search_model_versions(f"name = '{NAMED}'")
                      if v.tags["dataset"] == "aliased"
                      and v.tags["dataset_fingerprint"] != champion.tags["dataset_fingerprint"])
    cases = [
        ([NAMED, "99"], f"promote: {NAMED} has no version 99 (versions: 1, 2, 3, 4, 5)"),
        (["msa-baseline-no_such_data", "1"], "promote: no registered model 'msa-baseline-no_such_data'"),
        ([NAMED, "5"], f"promote: version 5 of {NAMED} is a model of dataset mosi_lite, not aliased"),
        ([NAMED, other_data], "promote: dataset fingerprint mismatch"),
    ]
    for arguments, message in cases:
        assert main(["registry", "promote", *arguments, "--reason", "try", "--tracking-uri", uri]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (arguments, err)
    assert main(["registry", "promote", NAMED, "2", "--reason", "  ", "--tracking-uri", uri]) == 2
    assert "--reason is empty" in capsys.readouterr().err
    assert registry_state(mlflow_client) == before


def test_promote_moves_champion_by_hand_and_records_who_asked_and_why(registry, capsys):
    mlflow_client, uri = registry["client"], registry["uri"]
    was = mlflow_client.get_model_version_by_alias(NAMED, CHAMPION).version
    target = next(n for n in ("2", "1") if n != was)
    assert main(["registry", "promote", NAMED, target, "--reason", "audited by hand", "--tracking-uri", uri]) == 0
    assert f"{NAMED} version {target} is champion (was version {was})" in capsys.readouterr().out
    promoted = mlflow_client.get_model_version(NAMED, target)
    assert aliases_of(mlflow_client)[CHAMPION] == target
    assert promoted.tags["msa.promoted_reason"] == "audited by hand"
    assert "@" in promoted.tags["msa.promoted_by"] and promoted.tags["msa.promoted_at"].endswith("Z")
    assert promoted.tags[REASON_TAG].startswith(f"promoted by hand by {promoted.tags['msa.promoted_by']}")
    assert mlflow_client.get_model_version(NAMED, was).tags[REPLACED_TAG].endswith("audited by hand")
    assert CHALLENGER not in aliases_of(mlflow_client) or aliases_of(mlflow_client)[CHALLENGER] != target

    # a version of other data takes champion only when asked to with --new-data
    fingerprint = promoted.tags["dataset_fingerprint"]
    other = next(v.version for v in mlflow_client.search_model_versions(f"name = '{NAMED}'")
                 if v.tags["dataset"] == "aliased" and v.tags["dataset_fingerprint"] != fingerprint)
    assert main(["registry", "promote", NAMED, other, "--reason", "new clips", "--new-data", "--tracking-uri", uri]) == 0
    assert aliases_of(mlflow_client)[CHAMPION] == other
    assert main(["registry", "promote", NAMED, other, "--reason", "again", "--tracking-uri", uri]) == 0
    assert "already champion; nothing changed" in capsys.readouterr().out
