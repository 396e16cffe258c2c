"""Champion race: many versions of one registered name registered at once by several processes,
round after round, and how often the champion ends on the wrong version.

Each round registers a fresh name: P processes wait at one barrier, then each makes V model
versions (`create_model_version` with the tags a registration writes: dataset, fingerprint,
selection metric, a random valid MAE) and gives each its alias with the decision module's
`assign`, as every registration does. The round is wrong when the `champion` alias then rests on
another version than the best (lowest valid MAE; the older on a tie). A registration that raises
is counted apart.

`--decision REV` loads `platform/tracking/aliases.py` as it was at git revision REV (e.g. the
decision before champions converged) instead of the installed one, so both run on the same
harness. Prints one JSON object.

    .venv/bin/python benchmarks/champion_race.py --rounds 50 [--processes 4 --versions 6] [--decision REV]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def decision_module(path: str):
    if not path:
        from msa.platform.tracking import aliases

        return aliases
    spec = importlib.util.spec_from_file_location("decision_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def register(uri: str, decision: str, rounds: list[tuple[str, list[float]]], barrier, answers) -> None:
    """One racing process: for each round, wait for the others, then register a version per score."""
    import logging

    from msa.platform.tracking.client import client

    logging.getLogger("mlflow").setLevel(logging.ERROR)  # "waiting for the version" lines
    assign = decision_module(decision).assign
    mlflow_client = client(uri)
    run_id = mlflow_client.create_run("0").info.run_id
    for name, scores in rounds:
        barrier.wait()
        for score in scores:
            try:
                version = mlflow_client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id, tags={
                    "dataset": name.split("-", 2)[2], "dataset_fingerprint": "f" * 64, "selection_metric": "mae",
                    "valid_mae": repr(score)}).version
                assign(mlflow_client, name, str(version))
                answers.put((name, str(version), score, ""))
            except Exception as exc:  # counted, with its first line
                answers.put((name, "", score, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--versions", type=int, default=6, help="versions each process registers per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decision", default="", help="git revision whose platform/tracking/aliases.py to race")
    args = parser.parse_args()

    from msa.platform.tracking.client import client
    from msa.platform.tracking.server import MlflowServer

    rng = random.Random(args.seed)
    plan = [[(f"msa-baseline-race{r}", [round(rng.uniform(0.6, 0.9), 3) for _ in range(args.versions)])
             for r in range(args.rounds)] for _ in range(args.processes)]
    with tempfile.TemporaryDirectory() as scratch, MlflowServer(Path(scratch) / "store") as server:
        decision = ""
        if args.decision:
            decision = str(Path(scratch) / "aliases.py")
            Path(decision).write_text(subprocess.run(["git", "show", f"{args.decision}:platform/tracking/aliases.py"],
                                                     cwd=ROOT, check=True, capture_output=True, text=True).stdout)
        mlflow_client = client(server.uri)
        for r in range(args.rounds):
            mlflow_client.create_registered_model(f"msa-baseline-race{r}")
        context = multiprocessing.get_context("spawn")
        barrier, answers = context.Barrier(args.processes), context.Queue()
        started = time.perf_counter()
        processes = [context.Process(target=register, args=(server.uri, decision, rounds, barrier, answers))
                     for rounds in plan]
        for process in processes:
            process.start()
        got = [answers.get(timeout=600) for _ in range(args.rounds * args.processes * args.versions)]
        for process in processes:
            process.join(timeout=60)
        seconds = time.perf_counter() - started
        wrong, raised = [], [answer for answer in got if answer[3]]
        for r in range(args.rounds):
            name = f"msa-baseline-race{r}"
            registered = [answer for answer in got if answer[0] == name and not answer[3]]
            best = min(registered, key=lambda answer: (answer[2], int(answer[1])))[1] if registered else ""
            champion = (mlflow_client.get_registered_model(name).aliases or {}).get("champion", "")
            if str(champion) != best:
                wrong.append({"round": r, "champion": str(champion), "best": best})
    print(json.dumps({
        "machine": f"{platform.node()} {os.cpu_count()} cores", "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "decision": args.decision or "installed", "rounds": args.rounds, "processes": args.processes,
        "versions_per_round": args.processes * args.versions, "wrong_champion_rounds": len(wrong),
        "registrations_raised": len(raised), "raised_examples": sorted({answer[3] for answer in raised})[:3],
        "wrong_examples": wrong[:5], "seconds": round(seconds, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
