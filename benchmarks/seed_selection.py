"""Does selecting on a seed mean pick better configs than selecting on one seed, at equal compute?

For each `--models` model on `--data`: `--configs` configs drawn at random from the model's own
search space (Optuna's RandomSampler, seeded), each trained with seeds 0 .. `--seeds`-1 (the
runs a sweep with ``budget.seeds_per_trial`` makes: one `train_loop` per seed, early stopping on
valid MAE, test predicted at the selected epoch). This pool is then searched many times over
(`--searches` search seeds), each search with the same compute, B training runs (for each B in
`--budgets`):

* S=1: B configs, each trained once (with one of its seeds, drawn at random);
* S=3: B / `--seeds` configs, each with all its seeds, scored on their mean.

Per search: the Kendall tau between the valid and the test ranking of the configs it saw, and
the test MAE of the config it chose on valid. That config's test MAE is given twice: as the
search reports it (its one run for S=1, its seed mean for S=3) and as what it is worth (its
mean over all the pool's seeds, the same yardstick for both arms). Over the whole pool: the
tau of each seed alone against the tau of the seed mean. Random search, not TPE: the question
is what selection does with noisy scores, and a shared pool lets many searches be compared
on the same runs. Trial-epochs are counted from each run's history. `--pool REPORT` searches the
pool of an earlier report again (other budgets, more searches) without training.

Prints one JSON object on stdout (progress on stderr).

    .venv/bin/python benchmarks/seed_selection.py --data ../shared/data/mosi_lite.npz
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from scipy.stats import kendalltau


def train_one(config: dict) -> dict:
    """One `train_loop` run in a worker process (one torch thread: two runs share 2 cores)."""
    import torch

    torch.set_num_threads(1)
    from msa.platform.training.loop import train_loop

    result = train_loop(config)
    return {"valid_mae": result.valid_metrics["mae"], "test_mae": result.test_metrics["mae"],
            "epochs": len(result.history), "best_epoch": result.best_epoch}


def sample_configs(model: str, count: int, seed: int) -> list[dict]:
    """`count` configs of `model` from its search space, as train-config overrides."""
    import optuna
    from ray.tune.utils.util import unflatten_dict

    from msa.platform.sweep.search_space import load_search_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_search_space(model)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    configs = []
    for _ in range(count):
        trial = study.ask(space.optuna_space())
        configs.append({**unflatten_dict(trial.params), **space.fixed_values()})
        study.tell(trial, 0.0)
    return configs


def tau(valid: list[float], test: list[float]) -> float | None:
    if len(valid) < 3:
        return None
    value = kendalltau(valid, test).statistic
    return None if value != value else float(value)


def searches(pool: list[list[dict]], budget: int, seeds: int, count: int) -> dict:
    """`count` searches per arm over `pool` (per config, its runs by seed)."""
    worth = [statistics.mean(run["test_mae"] for run in runs) for runs in pool]
    arms = {}
    for arm, per_config in (("S=1", 1), (f"S={seeds}", seeds)):
        taus, reported, chosen_worth, epochs = [], [], [], []
        for search_seed in range(count):
            rng = random.Random(search_seed)
            picked = rng.sample(range(len(pool)), budget // per_config)
            scored = []  # (config, valid, test) of each picked config, as this search sees it
            for index in picked:
                runs = pool[index] if per_config > 1 else [rng.choice(pool[index])]
                epochs.append(sum(run["epochs"] for run in runs))
                scored.append((index, statistics.mean(r["valid_mae"] for r in runs),
                               statistics.mean(r["test_mae"] for r in runs)))
            taus.append(tau([s[1] for s in scored], [s[2] for s in scored]))
            best = min(scored, key=lambda s: s[1])
            reported.append(best[2])
            chosen_worth.append(worth[best[0]])
        found = [t for t in taus if t is not None]
        arms[arm] = {
            "configs_per_search": budget // per_config, "runs_per_search": budget // per_config * per_config,
            "trial_epochs_per_search": round(sum(epochs) / count, 1),
            "kendall_tau_mean": round(statistics.mean(found), 3), "kendall_tau_sd": round(statistics.stdev(found), 3),
            "chosen_test_mae_reported_mean": round(statistics.mean(reported), 4),
            "chosen_test_mae_worth_mean": round(statistics.mean(chosen_worth), 4),
            "chosen_test_mae_worth_sd": round(statistics.stdev(chosen_worth), 4),
        }
    return arms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--models", nargs="+", default=["invariant", "dbr"])
    parser.add_argument("--configs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--budgets", type=int, nargs="+", default=[9, 12, 15, 18],
                        help="training runs per search, each divisible by --seeds and at most --configs")
    parser.add_argument("--searches", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pool", help="a report this script printed: search its pool again instead of training one")
    args = parser.parse_args()
    data = str(Path(args.data).resolve())
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "data": args.data, "configs": args.configs,
              "seeds": args.seeds, "epochs": args.epochs, "budget_runs": args.budgets, "searches": args.searches,
              "models": {}}
    pools = json.loads(Path(args.pool).read_text())["models"] if args.pool else {}
    with tempfile.TemporaryDirectory() as scratch, \
            ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as workers:
        for model in args.models:
            started = time.perf_counter()
            if model in pools:
                pool, seconds = pools[model]["runs"], pools[model]["pool_seconds"]
            else:
                configs = sample_configs(model, args.configs, seed=0)
                jobs = [{**config, "model": model, "data": data, "epochs": args.epochs, "patience": 6, "seed": seed,
                         "out": str(Path(scratch) / model / f"c{number}-s{seed}")}
                        for number, config in enumerate(configs) for seed in range(args.seeds)]
                runs = list(workers.map(train_one, jobs))
                pool = [runs[number * args.seeds:(number + 1) * args.seeds] for number in range(args.configs)]
                seconds = round(time.perf_counter() - started, 1)
                print(f"{model}: {len(runs)} runs in {seconds:.0f} s", file=sys.stderr, flush=True)
            valid_mean = [statistics.mean(r["valid_mae"] for r in runs) for runs in pool]
            test_mean = [statistics.mean(r["test_mae"] for r in runs) for runs in pool]
            report["models"][model] = {
                "pool_seconds": seconds,
                "pool_tau_one_seed": [round(tau([runs[s]["valid_mae"] for runs in pool],
                                                [runs[s]["test_mae"] for runs in pool]), 3) for s in range(args.seeds)],
                "pool_tau_seed_mean": round(tau(valid_mean, test_mean), 3),
                "valid_mae_sd_between_seeds_median": round(statistics.median(
                    statistics.stdev(r["valid_mae"] for r in runs) for runs in pool), 4),
                "valid_mae_sd_between_configs": round(statistics.stdev(valid_mean), 4),
                "best_config_test_mae_worth": round(min(test_mean), 4),
                "searches": {str(budget): searches(pool, budget, args.seeds, args.searches) for budget in args.budgets},
                "runs": pool,
            }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
