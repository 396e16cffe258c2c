"""The matrix schedule at cluster scale, simulated: a discrete-event replay of trial durations and
learning curves recorded from real sweeps here, sequential against concurrent. Prints one JSON
object.

    # record curves from real run directories (this layout or the one before), once:
    .venv/bin/python benchmarks/matrix_simulation.py record RUN_DIR... --out benchmarks/matrix_curves.json
    # replay them: 12 pairs (3 models x 4 datasets), 64 trials each, 64 slots
    .venv/bin/python benchmarks/matrix_simulation.py replay benchmarks/matrix_curves.json --slots 64 --pairs 12 --trials 64

What is replayed: each pair draws its trials (seeded, with replacement) from the recorded
trials of its model; a trial runs epoch by epoch with the recorded epoch seconds, and after each
epoch reports its recorded best-so-far valid metric to its own pair's ASHA, Ray's
`ASHAScheduler` itself, which decides to stop it or let it go on. A free slot goes to the pair
`msa.platform.sweep.schedule.next_pair` picks (the code the sweep runs; `concurrent_fair_share`
replays an alternative rule, the pair with the fewest trials running), after `--gap-s`
seconds (Tune's hand-over between two trials on a slot, measured here). A pair's champion is
registered `--register-s` seconds after its last trial ends.

What it leaves out: the searcher's adaptivity (TPE would draw better configs as a study
learns; here draws are independent), dataset-specific durations (every dataset of a model uses
that model's curves), failures and retries, node start-up and data loading, and contention
between trials. A recorded curve cut short by ASHA in its real sweep, but let go on here, is
extended with its last epoch's seconds and no improvement (counted as `extended_epochs`).
"""
from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from msa.platform.core.metrics import METRIC_MODES
from msa.platform.sweep.schedule import PairLoad, next_pair, pair_scheduler

sys.path.insert(0, str(Path(__file__).parent))
from matrix_schedule import trial_records  # noqa: E402


def record(run_dirs: list[Path], out: Path) -> None:
    trials = [{k: r[k] for k in ("model", "metric", "epoch_seconds", "curve", "final")}
              for run_dir in run_dirs for r in trial_records(run_dir)]
    out.write_text(json.dumps({"sources": [str(d) for d in run_dirs], "trials": trials}) + "\n")
    counts = defaultdict(int)
    for trial in trials:
        counts[trial["model"]] += 1
    print(json.dumps({"recorded": dict(counts), "out": str(out)}))


def fair_share(loads: list[PairLoad], *, schedule: str, max_per_pair: int | None) -> str | None:
    """An alternative to `next_pair` measured here only: the free slot goes to the pair with the
    fewest trials running (every study progresses evenly)."""
    candidates = [load for load in loads if not load.exhausted]
    return min(candidates, key=lambda load: load.running).pair if candidates else None


def simulate(pool: dict[str, list[dict]], *, models: list[str], datasets: int, trials: int, slots: int,
             schedule: str, max_t: int, grace: int, rf: int, gap_s: float, register_s: float, seed: int,
             policy=next_pair) -> dict:
    """One replay; the pairs are ``model x dataset index``, in the sweep's order."""
    rng = random.Random(seed)
    pairs = [f"{model}-d{d}" for model in models for d in range(datasets)]
    draws = {pair: [rng.choice(pool[pair.rsplit("-", 1)[0]]) for _ in range(trials)] for pair in pairs}
    metric = {pair: draws[pair][0]["metric"] for pair in pairs}
    ashas = {pair: pair_scheduler("asha", metric="m", mode=METRIC_MODES[metric[pair]], unit="epochs", max_t=max_t,
                                  grace_period=grace, reduction_factor=rf) for pair in pairs}
    started = {pair: 0 for pair in pairs}
    running = {pair: 0 for pair in pairs}
    last_end = {pair: 0.0 for pair in pairs}
    events: list = []  # (time, order, kind, payload)
    order = 0
    free_slots, now, busy, extended = slots, 0.0, 0.0, 0

    def fill(at: float) -> None:
        nonlocal free_slots, order
        while free_slots:
            loads = [PairLoad(p, running[p], started[p] >= trials) for p in pairs]
            pair = policy(loads, schedule=schedule, max_per_pair=None)
            if pair is None:
                return
            recorded = draws[pair][started[pair]]
            trial = Trial("replay", config={}, stub=True)
            ashas[pair].on_trial_add(None, trial)
            started[pair] += 1
            running[pair] += 1
            free_slots -= 1
            order += 1
            heapq.heappush(events, (at + gap_s, order, "epoch", (pair, trial, recorded, 0, at + gap_s)))

    fill(0.0)
    while events:
        now, _, kind, (pair, trial, recorded, epoch, trial_start) = heapq.heappop(events)
        if kind == "epoch":  # epoch `epoch` (0-based) starts now
            if epoch < len(recorded["epoch_seconds"]):
                seconds = recorded["epoch_seconds"][epoch]
            else:
                seconds, extended = recorded["epoch_seconds"][-1], extended + 1
            order += 1
            heapq.heappush(events, (now + seconds, order, "report", (pair, trial, recorded, epoch + 1, trial_start)))
            continue
        value = recorded["curve"][min(epoch, len(recorded["curve"])) - 1]
        natural_end = epoch >= max_t or (recorded["final"] and epoch >= len(recorded["curve"]))
        decision = ashas[pair].on_trial_result(None, trial, {"epoch": epoch, "m": value})
        if natural_end or decision == TrialScheduler.STOP:
            ashas[pair].on_trial_complete(None, trial, {"epoch": epoch, "m": value})
            busy += now - trial_start + 0.0
            running[pair] -= 1
            last_end[pair] = max(last_end[pair], now)
            free_slots += 1
            fill(now)
        else:
            order += 1
            heapq.heappush(events, (now, order, "epoch", (pair, trial, recorded, epoch, trial_start)))
    makespan = max(last_end.values())
    champion = {pair: round(last_end[pair] + register_s, 1) for pair in pairs}
    return {"makespan_s": round(makespan, 1), "utilisation": round(busy / (slots * makespan), 4),
            "first_champion_s": min(champion.values()), "median_champion_s": statistics.median(champion.values()),
            "last_champion_s": max(champion.values()), "champion_s": champion, "extended_epochs": extended}


def replay(args) -> None:
    recorded = json.loads(args.curves.read_text())["trials"]
    pool = defaultdict(list)
    for trial in recorded:
        pool[trial["model"]].append(trial)
    # The sweep's order: the slowest model first (README: the matrix then ends on short trials).
    models = sorted(pool, key=lambda m: -statistics.mean(sum(t["epoch_seconds"]) for t in pool[m]))
    if args.pairs % len(models):
        raise SystemExit(f"--pairs {args.pairs} is not a multiple of the {len(models)} recorded models {models}")
    report = {"command": " ".join(sys.argv), "recorded_trials": {m: len(t) for m, t in pool.items()},
              "model_order": models, "pairs": args.pairs, "trials_per_pair": args.trials, "slots": args.slots,
              "seeds": args.seeds}
    for schedule, policy in (("sequential", next_pair), ("concurrent", next_pair), ("concurrent_fair_share", fair_share)):
        runs = [simulate(pool, models=models, datasets=args.pairs // len(models), trials=args.trials, slots=args.slots,
                         schedule=schedule.removesuffix("_fair_share"), max_t=args.max_t, grace=args.grace, rf=args.rf,
                         gap_s=args.gap_s, register_s=args.register_s, seed=seed, policy=policy)
                for seed in range(args.seeds)]
        report[schedule] = {key: round(statistics.mean(r[key] for r in runs), 4 if key == "utilisation" else 1)
                            for key in ("makespan_s", "utilisation", "first_champion_s", "median_champion_s",
                                        "last_champion_s", "extended_epochs")}
        report[schedule]["utilisation_min"] = min(r["utilisation"] for r in runs)
        report[schedule]["champion_s_seed0"] = runs[0]["champion_s"]
    print(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record", help="read trial curves from run directories into a JSON file")
    rec.add_argument("run_dirs", nargs="+", type=Path)
    rec.add_argument("--out", type=Path, required=True)
    rep = commands.add_parser("replay", help="simulate sequential and concurrent schedules")
    rep.add_argument("curves", type=Path)
    rep.add_argument("--slots", type=int, default=64)
    rep.add_argument("--pairs", type=int, default=12)
    rep.add_argument("--trials", type=int, default=64)
    rep.add_argument("--max-t", type=int, default=6, help="ASHA max_t: the recorded sweeps' max_epochs")
    rep.add_argument("--grace", type=int, default=2)
    rep.add_argument("--rf", type=int, default=2)
    rep.add_argument("--gap-s", type=float, default=0.5, help="hand-over seconds between trials on a slot")
    rep.add_argument("--register-s", type=float, default=5.0, help="seconds from a study's end to its champion")
    rep.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    if args.command == "record":
        record(args.run_dirs, args.out)
    else:
        replay(args)


if __name__ == "__main__":
    main()
