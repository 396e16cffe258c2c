"""The leaderboard export: one record (`board.Leaderboard`), five renderings (CSV, Markdown and
JSON here; the HTML page a person reads, `board_html.py`; LaTeX tables for a paper,
`board_latex.py`). The JSON is the record's file form and the source the others are rendered
from (`msa leaderboard`).

Undefined values (``None``, and NaN or infinite floats) are ``null`` in JSON, an empty cell in CSV
and ``–`` in Markdown and HTML. Every metric header names its direction: ``(higher is better)`` /
``(lower is better)`` in CSV, ``↑`` / ``↓`` in Markdown and HTML. JSON keeps every number at full
precision; CSV, Markdown and HTML round each metric as it is read.

Example:
    >>> board = Leaderboard(run_dir="/runs/demo", created="2026-11-25T19:00:00Z", protocol="crossfit",
    ...                     folds=5, bootstrap=1000)
    >>> render(board, "md").splitlines()[0]
    '# Leaderboard'
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from msa.ensembles.board import BoardRow, DatasetBoard, Leaderboard
from msa.ensembles.board_html import to_html
from msa.ensembles.board_latex import to_latex
from msa.ensembles.board_text import (
    ARROWS,
    MISSING,
    RANKING_SENTENCE,
    decimals,
    facts,
    intro,
    legend,
    number,
    rounded,
    unique,
)
from msa.platform.core.errors import MsaError
from msa.platform.core.files import atomic_write
from msa.platform.core.run_dir import RunDir

FORMATS = ("csv", "md", "json", "html", "latex")
SUFFIXES = {"csv": ".csv", "md": ".md", "json": ".json", "html": ".html", "latex": ".tex"}


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def render(board: Leaderboard, fmt: str) -> str:
    """The leaderboard in one of `FORMATS`.

    Raises:
        MsaError: `fmt` is not one of `FORMATS`.
    """
    renderers = {"csv": to_csv, "md": to_markdown, "json": to_json, "html": to_html, "latex": to_latex}
    if fmt not in renderers:
        raise MsaError(f"unknown leaderboard format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return renderers[fmt](board)


def write_all(board: Leaderboard, *folders: Path, stem: str = "leaderboard") -> list[dict[str, Path]]:
    """Write ``<stem>.csv``, ``.md``, ``.json``, ``.html`` and ``.tex`` into each of `folders`, each atomically.

    Every format is rendered once, before the first file is written, so a rendering error
    writes nothing. Returns, per folder, the path of each format."""
    texts = {fmt: render(board, fmt) for fmt in FORMATS}
    written = []
    for folder in folders:
        paths: dict[str, Path] = {}
        for fmt, text in texts.items():
            path = Path(folder) / f"{stem}{SUFFIXES[fmt]}"
            atomic_write(path, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8", newline=""))
            paths[fmt] = path
        written.append(paths)
    return written


# --------------------------------------------------------------------------------------------
# JSON and CSV
# --------------------------------------------------------------------------------------------


def to_json(board: Leaderboard) -> str:
    """The document itself, indented by 2; NaN and infinite floats become ``null``."""
    return board.to_json()


def to_csv(board: Leaderboard) -> str:
    """One row per (dataset, row), in rank order.

    Columns: ``dataset``, ``rank``, ``name``, ``kind``, ``stack_level``, ``valid_<sel> (<dir> is
    better)``, ``valid_estimate``, ``test_<m> (<dir> is better)`` for every metric, ``diff_<m>``,
    ``diff_<m>_low``, ``diff_<m>_high`` for every metric (row minus best single on test, paired
    bootstrap 95% interval), ``members`` (``name:weight; name:weight``, weights to 4 decimals),
    ``fit_seconds``, ``predict_seconds``, ``mlflow_run_id``, ``registered``, then ``seeds`` (a
    seed group's seed count, else empty) and ``sd_valid_<sel>``, ``sd_test_<m>`` (its seeds'
    standard deviations).

    Datasets with different metric suites share one table: the metric columns are the union over
    the datasets, in order of first appearance, and a cell is empty where a dataset lacks the
    metric (as it is for an undefined value). Metrics and their differences are rounded as the
    metric is read (accuracies and F1, in percent, to 1 decimal; MAE and Corr to 3), seconds to
    2 decimals; ``leaderboard.json`` keeps full precision.
    """
    datasets = board.datasets
    valid_columns = unique((d.selection_metric, d.directions[d.selection_metric]) for d in datasets)
    test_columns = unique((m, d.directions[m]) for d in datasets for m in d.metrics)
    diff_metrics = unique(m for d in datasets for m in d.metrics)
    header = ["dataset", "rank", "name", "kind", "stack_level"]
    header += [_csv_metric("valid", m, direction) for m, direction in valid_columns]
    header += ["valid_estimate"]
    header += [_csv_metric("test", m, direction) for m, direction in test_columns]
    header += [f"diff_{m}{part}" for m in diff_metrics for part in ("", "_low", "_high")]
    header += ["members", "fit_seconds", "predict_seconds", "mlflow_run_id", "registered", "seeds"]
    header += [f"sd_valid_{m}" for m, _ in valid_columns] + [f"sd_test_{m}" for m in diff_metrics]

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=header, restval="")
    writer.writeheader()
    for entry in datasets:
        sel, directions = entry.selection_metric, entry.directions
        for rank, row in enumerate(entry.rows, start=1):
            record: dict[str, str] = {
                "dataset": entry.dataset, "rank": str(rank), "name": row.name, "kind": row.kind,
                "stack_level": _csv_value(row.stack_level),
                _csv_metric("valid", sel, directions[sel]): _csv_value(row.valid.get(sel), decimals(sel)),
                "valid_estimate": row.valid_estimate,
                "members": "; ".join(f"{m.name}:{m.weight:.4f}" for m in row.members),
                "fit_seconds": _csv_value(row.fit_seconds, 2),
                "predict_seconds": _csv_value(row.predict_seconds, 2),
                "mlflow_run_id": row.mlflow_run_id or "", "registered": row.registered or "",
                "seeds": _csv_value(row.seeds.count if row.seeds else None),
                f"sd_valid_{sel}": _csv_value(row.sd("valid", sel), decimals(sel)),
            }
            for m in entry.metrics:
                record[f"sd_test_{m}"] = _csv_value(row.sd("test", m), decimals(m))
                record[_csv_metric("test", m, directions[m])] = _csv_value(row.test.get(m), decimals(m))
                diff = row.diff(m)
                for part, value in (("", diff.diff), ("_low", diff.low), ("_high", diff.high)):
                    record[f"diff_{m}{part}"] = _csv_value(value, decimals(m))
            writer.writerow(record)
    return out.getvalue()


def _csv_metric(split: str, metric: str, direction: str) -> str:
    return f"{split}_{metric} ({direction} is better)"


def _csv_value(value: Any, places: int | None = None) -> str:
    """A cell: a number to `places` decimals (None: as it is, for counts), empty when undefined."""
    found = number(value)
    if found is None:
        return "" if value is None or isinstance(value, float) else str(value)
    return repr(found) if places is None else f"{found:.{places}f}"


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def to_markdown(board: Leaderboard) -> str:
    """A header (run, protocol, folds, created, bootstrap), the ranking sentence, a legend, then per
    dataset a ``## <dataset>`` section with one table. Metrics rounded as the HTML rounds them
    (a seed group's followed by `` ± <sd>``), seconds to 2 decimals, undefined as ``–``."""
    lines = ["# Leaderboard", ""]
    lines += [f"- {label}: {value}" for label, value in facts(board)]
    lines += ["", RANKING_SENTENCE, "", legend(board)]
    for entry in board.datasets:
        header, rows, numeric = _table(entry)
        lines += ["", f"## {_md_cell(entry.dataset)}", "", intro(entry), ""]
        lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
        lines.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
        lines += ["| " + " | ".join(_md_cell(c if isinstance(c, str) else "; ".join(c)) for c in row) + " |"
                  for row in rows]
    return "\n".join(lines) + "\n"


def _table(entry: DatasetBoard) -> tuple[list[str], list[list[str | tuple[str, ...]]], list[bool]]:
    """The header, the cells and which columns hold numbers, for one dataset's Markdown table. A
    cell of several lines (the members) is a tuple, joined with ``; ``."""
    sel, directions = entry.selection_metric, entry.directions
    header = ["rank", "name", "kind", "level", f"valid {sel} {ARROWS[directions[sel]]}", "valid estimate"]
    header += [f"test {m} {ARROWS[directions[m]]}" for m in entry.metrics]
    header += [f"Δ{sel} vs best single [95% CI]", "members", "fit s", "predict s", "MLflow run", "registered"]
    rows = []
    for rank, row in enumerate(entry.rows, start=1):
        diff = row.diff(sel)
        cells = [str(rank), str(row.name), str(row.kind), str(row.stack_level),
                 _with_sd(row, "valid", sel), str(row.valid_estimate or MISSING)]
        cells += [_with_sd(row, "test", m) for m in entry.metrics]
        cells.append(MISSING if not diff.defined else
                     f"{rounded(sel, diff.diff, signed=True)} "
                     f"[{rounded(sel, diff.low, signed=True)}, {rounded(sel, diff.high, signed=True)}]")
        cells.append(tuple(f"{m.name} {m.weight:.4f}" for m in row.members) or MISSING)
        cells += [_seconds(row.fit_seconds), _seconds(row.predict_seconds),
                  row.mlflow_run_id or MISSING, row.registered or MISSING]
        rows.append(cells)
    numeric = [h not in ("name", "kind", "valid estimate", "members", "MLflow run", "registered") for h in header]
    return header, rows, numeric


def _with_sd(row: BoardRow, split: str, metric: str) -> str:
    sd = row.sd(split, metric)
    return rounded(metric, row.score(split, metric)) + ("" if sd is None else f" ± {rounded(metric, sd)}")


def _md_cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _seconds(value: Any) -> str:
    found = number(value)
    return MISSING if found is None else f"{found:.2f}"


# --------------------------------------------------------------------------------------------
# msa leaderboard
# --------------------------------------------------------------------------------------------


def export_board(source: Path, fmt: str, out: Path | None) -> str | None:
    """`msa leaderboard`: render the leaderboard found at `source` (a run directory, an
    ensembles folder or a leaderboard.json) as `fmt`; write it to `out` (atomically) and return
    None, or return the text when `out` is None.

    Raises:
        MsaError: no leaderboard there, a malformed one, or a missing output folder.
    """
    path = Path(source)
    if path.is_dir():
        ensembles = RunDir(path).ensembles_dir  # a run directory, or an ensembles folder itself
        path = (ensembles if ensembles.is_dir() else path) / f"leaderboard{SUFFIXES['json']}"
    if not path.is_file():
        raise MsaError(f"no leaderboard at {path}; run msa ensemble RUN_DIR first")
    text = render(Leaderboard.read(path), fmt)
    if out is None:
        return text
    if not Path(out).parent.is_dir():
        raise MsaError(f"--out {out}: folder {Path(out).parent} does not exist")
    atomic_write(Path(out), lambda tmp: tmp.write_text(text))
    return None
