"""One champion whatever the order: many versions of one name registered at once from several
processes into the session's MLflow server, and a promotion by hand that later registrations undo
only by beating it. Versions are made with `create_model_version` (tags as a registration writes them) and
given their alias by `aliases.assign`, the call every registration ends with: the race is in the
alias decision, not in logging a model."""
from __future__ import annotations

import multiprocessing
import random
import re

from msa.platform.tracking.aliases import CHALLENGER, CHAMPION, REASON_TAG, REPLACED_TAG, assign, dataset_of, promote

FINGERPRINT = "f" * 64
PROCESSES, VERSIONS_EACH, ROUNDS = 4, 6, 3


def register_at_once(uri: str, name: str, scores: list[float], barrier, answers) -> None:
    """One process of the race: wait for the others, then register a version per score and ask
    `assign` for its alias (run in a process of its own: the race is between processes)."""
    from msa.platform.tracking.client import client

    mlflow_client = client(uri)
    run_id = mlflow_client.create_run("0").info.run_id
    barrier.wait()
    for score in scores:
        try:
            version = mlflow_client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id, tags={
                "dataset": dataset_of(name), "dataset_fingerprint": FINGERPRINT, "selection_metric": "mae",
                "valid_mae": repr(score)}).version
            answers.put((str(version), score, assign(mlflow_client, name, str(version))))
        except Exception as exc:  # the test fails on it, naming it
            answers.put(("raised", score, repr(exc)))


def race(uri: str, name: str, scores: list[list[float]]) -> list[tuple]:
    """Every list of `scores` registered by a process of its own, all starting at one moment."""
    context = multiprocessing.get_context("spawn")
    barrier, answers = context.Barrier(len(scores)), context.Queue()
    processes = [context.Process(target=register_at_once, args=(uri, name, each, barrier, answers)) for each in scores]
    for process in processes:
        process.start()
    got = [answers.get(timeout=300) for _ in range(sum(map(len, scores)))]
    for process in processes:
        process.join(timeout=60)
    return got


def versions_by_number(mlflow_client, name: str) -> dict[str, object]:
    return {str(v.version): v for v in mlflow_client.search_model_versions(f"name = '{name}'")}


def test_versions_registered_at_once_by_several_processes_end_with_the_best_one_champion(mlflow_client):
    for round_ in range(ROUNDS):
        name = f"msa-baseline-race{round_}"
        mlflow_client.create_registered_model(name)
        rng = random.Random(round_)
        scores = [[round(rng.uniform(0.6, 0.9), 3) for _ in range(VERSIONS_EACH)] for _ in range(PROCESSES)]
        answers = race(mlflow_client.tracking_uri, name, scores)
        assert [a for a in answers if a[0] == "raised"] == []
        best = min(answers, key=lambda a: (a[1], int(a[0])))[0]
        aliases = mlflow_client.get_registered_model(name).aliases
        assert aliases[CHAMPION] == best, (round_, answers)
        assert aliases.get(CHALLENGER) != best
        versions = versions_by_number(mlflow_client, name)
        assert len(versions) == PROCESSES * VERSIONS_EACH
        for number, version in versions.items():
            reason = version.tags[REASON_TAG]
            score = float(version.tags["valid_mae"])
            compared = re.fullmatch(r"(beats|does not beat) the champion: valid mae ([\d.]+) against ([\d.]+) of "
                                    r"champion version (\d+) \(lower is better\)", reason)
            if reason == f"no champion of {name} to beat":
                continue
            assert compared, reason
            verb, own, other, other_number = compared.groups()
            assert float(own) == score and other_number != number
            assert float(other) == float(versions[other_number].tags["valid_mae"])
            assert (verb == "beats") == (score < float(other) or (score == float(other) and int(number) < int(other_number)))
        # every champion the alias left names its successor
        for number, version in versions.items():
            if REPLACED_TAG in version.tags:
                assert re.match(r"version \d+: ", version.tags[REPLACED_TAG]) and number != best


def test_a_promotion_by_hand_is_not_undone_by_later_registrations_that_do_not_beat_it(mlflow_client):
    name = "msa-baseline-promoted"
    mlflow_client.create_registered_model(name)
    race(mlflow_client.tracking_uri, name, [[0.80, 0.85], [0.82]])
    by_score = {v.tags["valid_mae"]: v.version for v in versions_by_number(mlflow_client, name).values()}
    assert mlflow_client.get_registered_model(name).aliases[CHAMPION] == by_score["0.8"]
    weakest = by_score["0.85"]
    said = promote(mlflow_client, name, weakest, reason="audited by hand")
    assert said.startswith(f"{name} version {weakest} is champion (was version {by_score['0.8']})")

    race(mlflow_client.tracking_uri, name, [[0.90], [0.86, 0.95]])  # all weaker than the promoted 0.85
    assert mlflow_client.get_registered_model(name).aliases[CHAMPION] == weakest
    versions = versions_by_number(mlflow_client, name)
    for number in ("4", "5", "6"):
        assert versions[number].tags[REASON_TAG].startswith("does not beat the champion: ")
        assert versions[number].tags[REASON_TAG].endswith(f"of champion version {weakest} (lower is better)")

    race(mlflow_client.tracking_uri, name, [[0.84], [0.88]])  # one beats the promoted version, one does not
    stronger = next(n for n, v in versions_by_number(mlflow_client, name).items() if v.tags["valid_mae"] == "0.84")
    assert mlflow_client.get_registered_model(name).aliases[CHAMPION] == stronger
    replaced = mlflow_client.get_model_version(name, weakest).tags[REPLACED_TAG]
    assert replaced.startswith(f"version {stronger}: beats the champion: valid mae 0.84 against 0.85 of champion version {weakest}")
