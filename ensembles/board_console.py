"""The leaderboard as `msa ensemble` and `msa run` print it at the end: per dataset, each row's
rank, name, kind, valid and test score on the selection metric (rounded as the HTML rounds them)
and its test difference to the best single model; the written files hold the rest."""
from __future__ import annotations

from pathlib import Path

from msa.ensembles.board import Leaderboard
from msa.ensembles.board_text import rounded


def to_console(board: Leaderboard, folder: Path) -> str:
    """The printed summary of `board`, whose files are in `folder`."""
    lines = []
    for entry in board.datasets:
        metric = entry.selection_metric
        lines += ["", f"[{entry.dataset}] ranked by valid {metric} ({entry.directions[metric]} is better); "
                      f"test difference vs best single with paired bootstrap 95% interval",
                  f"{'#':>3}  {'name':<34}{'kind':<15}{'valid':>9}{'test':>9}  {'test diff [95% CI]':<28}registered"]
        for rank, row in enumerate(entry.rows, 1):
            diff = row.diff(metric)
            interval = "-" if not diff.defined else (
                f"{rounded(metric, diff.diff, signed=True)} "
                f"[{rounded(metric, diff.low, signed=True)}, {rounded(metric, diff.high, signed=True)}]")
            lines.append(f"{rank:>3}  {row.name:<34}{row.kind:<15}{rounded(metric, row.valid.get(metric)):>9}"
                         f"{rounded(metric, row.test.get(metric)):>9}  {interval:<28}{row.registered}")
    lines += ["", f"leaderboard: {folder}/leaderboard.{{csv,md,json,html,tex}}"]
    return "\n".join(lines)
