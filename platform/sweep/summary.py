"""What a sweep reports: one `PairSummary` per (model, dataset) study, read back from the Optuna
study (the record of what happened), and the `SweepResult` that `run_sweep` returns; written to
the run directory as summary.json and summary.csv and printed as a table."""
from __future__ import annotations

import csv
import dataclasses
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from msa.platform.core.files import atomic_write
from msa.platform.core.metrics import METRIC_MODES, loss_of
from msa.platform.core.run_dir import RunDir
from msa.platform.sweep.warm_start import own_trials
from msa.platform.tracking.client import TRIAL_TAG
from msa.platform.training.checkpoint import SeedGroup

CONSOLE_WIDTH = 100  # the summary's lines, so that a terminal shows them unwrapped


@dataclass(frozen=True)
class PairSummary:
    """One study's outcome: trial counts by state, and its best trial by the valid metric."""

    pair: str
    model: str
    dataset: str
    metric: str  # valid_<metric>
    mode: str
    trials: int
    complete: int
    pruned: int
    failed: int
    best_value: float | None = None
    best_params: dict[str, Any] | None = None
    best_checkpoint: str | None = None

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed


def summarize_study(study, *, run_dir: RunDir, pair: str, model: str, dataset: str, metric: str) -> PairSummary:
    """Counts and the best trial of `study`, among this sweep's own (a PRUNED trial's value is
    its last, best-so-far intermediate value, so it competes too)."""
    trials = own_trials(study)
    counts = {state: sum(t.state == state for t in trials) for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    scored = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.value is not None]
    best = min(scored, key=lambda t: loss_of(metric, t.value)) if scored else None
    summary = PairSummary(pair=pair, model=model, dataset=dataset, metric=f"valid_{metric}", mode=METRIC_MODES[metric],
                          trials=len(trials), complete=counts[TrialState.COMPLETE], pruned=counts[TrialState.PRUNED],
                          failed=counts[TrialState.FAIL])
    if best is None:
        return summary
    folder = run_dir.trial(pair, best.user_attrs.get(TRIAL_TAG, ""))
    return dataclasses.replace(summary, best_value=best.value, best_params=best.params,
                               best_checkpoint=str(folder) if SeedGroup(folder).exists() else None)


@dataclass(frozen=True)
class SweepResult:
    """A finished sweep: where it lives and each pair's summary, in the order they ran."""

    run_dir: RunDir
    pairs: tuple[PairSummary, ...]

    def write(self) -> None:
        """summary.json and summary.csv in the run directory."""
        rows = [dataclasses.asdict(p) for p in self.pairs]
        atomic_write(self.run_dir.summary_json, lambda tmp: tmp.write_text(json.dumps(rows, indent=2, default=str)))
        atomic_write(self.run_dir.summary_csv, lambda tmp: _write_csv(tmp, rows))

    def table(self, width: int = CONSOLE_WIDTH) -> str:
        """The summary a person reads at the end of a sweep: a row per pair, its best config
        below it as ``key=value`` lines at most `width` wide (summary.json holds it in full)."""
        lines = [f"{'pair':<34}{'trials':>7}{'done':>6}{'pruned':>8}{'failed':>8}  best valid"]
        for p in self.pairs:
            best = "-" if p.best_value is None else f"{p.metric.removeprefix('valid_')} {p.best_value:.4g}"
            lines.append(f"{p.pair:<34}{p.trials:>7}{p.complete:>6}{p.pruned:>8}{p.failed:>8}  {best}")
            if p.best_params:
                settings = " ".join(f"{name.replace('/', '.')}={_short(value)}" for name, value in p.best_params.items())
                lines += textwrap.wrap(settings, width=width, initial_indent="  best config: ",
                                       subsequent_indent=" " * len("  best config: "), break_long_words=False,
                                       break_on_hyphens=False)
        lines.append(f"full configs: {self.run_dir.summary_json}")
        return "\n".join(lines)


def _short(value: Any) -> str:
    """A searched value as a person reads it: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


SUMMARY_COLUMNS = ("pair", "trials", "complete", "pruned", "failed", "metric", "best_value", "best_checkpoint")


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*SUMMARY_COLUMNS, "best_params"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "best_params": json.dumps(r["best_params"])} for r in rows)
