"""The leaderboard export: one document, five renderings (CSV, Markdown and JSON at full
precision here; the HTML page a person reads, `board_html.py`; LaTeX tables for a paper,
`board_latex.py`).

The document is a plain JSON-serialisable dict built by the ensemble job (see ``ensembles/README.md``):
run facts at the top (``run_dir``, ``created``, ``protocol``, ``folds``, ``bootstrap``) and one entry
per dataset with its metric suite, the selection metric, every metric's direction (``"higher"`` or
``"lower"`` is better), the best single model and the rows. The rows arrive ranked by the valid
selection metric and keep that order (rank = position, from 1); test is only reported, never used to
order anything. Each row carries its test metrics and, per metric, the difference to the best single
model on test with a paired-bootstrap 95% interval (``test_diff``). A seed group's row has
``seeds``: its seed count and each metric's standard deviation over the seeds (``valid_sd``,
``test_sd``; its ``valid`` and ``test`` are then the seed means); other rows have none.

Undefined values (``None``, and NaN or infinite floats) are ``null`` in JSON, an empty cell in CSV
and ``–`` in Markdown and HTML. Every metric header names its direction: ``(higher is better)`` /
``(lower is better)`` in CSV, ``↑`` / ``↓`` in Markdown and HTML.

Example:
    >>> board = {"run_dir": "/runs/demo", "created": "2026-11-25T19:00:00Z", "protocol": "crossfit",
    ...          "folds": 5, "bootstrap": 1000, "datasets": []}
    >>> render(board, "md").splitlines()[0]
    '# Leaderboard'
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

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
    seed_sd,
    unique,
)
from msa.platform.core.errors import MsaError
from msa.platform.core.files import atomic_write, finite_or_none
from msa.platform.core.run_dir import RunDir

FORMATS = ("csv", "md", "json", "html", "latex")
SUFFIXES = {"csv": ".csv", "md": ".md", "json": ".json", "html": ".html", "latex": ".tex"}
DIRECTIONS = ("higher", "lower")

BOARD_KEYS = ("run_dir", "created", "protocol", "folds", "bootstrap", "datasets")
DATASET_KEYS = ("dataset", "metric_suite", "task", "selection_metric", "metrics", "directions", "best_single",
                "rows")
ROW_KEYS = ("name", "kind", "stack_level", "valid", "valid_estimate", "test", "test_diff", "members",
            "fit_seconds", "predict_seconds", "mlflow_run_id", "registered")


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def render(board: dict, fmt: str) -> str:
    """The leaderboard in one of `FORMATS`.

    Raises:
        MsaError: `fmt` is not one of `FORMATS`.
    """
    renderers = {"csv": to_csv, "md": to_markdown, "json": to_json, "html": to_html, "latex": to_latex}
    if fmt not in renderers:
        raise MsaError(f"unknown leaderboard format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return renderers[fmt](board)


def write_all(board: dict, *folders: Path, stem: str = "leaderboard") -> list[dict[str, Path]]:
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


def read_board(path: Path) -> dict:
    """Read a ``leaderboard.json`` written by `write_all` (or `to_json`) back into the document.

    Raises:
        MsaError: the file is missing or unreadable, is not JSON, or lacks a key of the document.
    """
    path = Path(path)
    try:
        board = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MsaError(f"leaderboard file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise MsaError(f"cannot read leaderboard {path}: {_one_line(error)}") from None
    except json.JSONDecodeError as error:
        raise MsaError(f"leaderboard {path} is not valid JSON: {_one_line(error)}") from None
    problem = _check_board(board)
    if problem:
        raise MsaError(f"leaderboard {path} is not a leaderboard document: {problem}")
    return board


# --------------------------------------------------------------------------------------------
# JSON and CSV
# --------------------------------------------------------------------------------------------


def to_json(board: dict) -> str:
    """The document itself, indented by 2; NaN and infinite floats become ``null``."""
    return json.dumps(finite_or_none(board), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def to_csv(board: dict) -> str:
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
    datasets = board["datasets"]
    valid_columns = unique((d["selection_metric"], d["directions"][d["selection_metric"]]) for d in datasets)
    test_columns = unique((m, d["directions"][m]) for d in datasets for m in d["metrics"])
    diff_metrics = unique(m for d in datasets for m in d["metrics"])
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
        sel, directions = entry["selection_metric"], entry["directions"]
        for rank, row in enumerate(entry["rows"], start=1):
            record: dict[str, str] = {
                "dataset": entry["dataset"], "rank": str(rank), "name": row["name"], "kind": row["kind"],
                "stack_level": _csv_value(row["stack_level"]),
                _csv_metric("valid", sel, directions[sel]): _csv_value(row["valid"].get(sel), decimals(sel)),
                "valid_estimate": row["valid_estimate"],
                "members": "; ".join(f"{m['name']}:{m['weight']:.4f}" for m in row["members"]),
                "fit_seconds": _csv_value(row["fit_seconds"], 2),
                "predict_seconds": _csv_value(row["predict_seconds"], 2),
                "mlflow_run_id": row["mlflow_run_id"] or "", "registered": row["registered"] or "",
                "seeds": _csv_value((row.get("seeds") or {}).get("count")),
                f"sd_valid_{sel}": _csv_value(seed_sd(row, "valid", sel), decimals(sel)),
            }
            for m in entry["metrics"]:
                record[f"sd_test_{m}"] = _csv_value(seed_sd(row, "test", m), decimals(m))
                record[_csv_metric("test", m, directions[m])] = _csv_value(row["test"].get(m), decimals(m))
                diff = row["test_diff"].get(m) or {}
                for part, key in (("", "diff"), ("_low", "low"), ("_high", "high")):
                    record[f"diff_{m}{part}"] = _csv_value(diff.get(key), decimals(m))
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


def to_markdown(board: dict) -> str:
    """A header (run, protocol, folds, created, bootstrap), the ranking sentence, a legend, then per
    dataset a ``## <dataset>`` section with one table. Metrics rounded as the HTML rounds them
    (a seed group's followed by `` ± <sd>``), seconds to 2 decimals, undefined as ``–``."""
    lines = ["# Leaderboard", ""]
    lines += [f"- {label}: {value}" for label, value in facts(board)]
    lines += ["", RANKING_SENTENCE, "", legend(board)]
    for entry in board["datasets"]:
        header, rows, numeric = _table(entry)
        lines += ["", f"## {_md_cell(entry['dataset'])}", "", intro(entry), ""]
        lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
        lines.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
        lines += ["| " + " | ".join(_md_cell(c if isinstance(c, str) else "; ".join(c)) for c in row) + " |"
                  for row in rows]
    return "\n".join(lines) + "\n"


def _table(entry: dict) -> tuple[list[str], list[list[str | tuple[str, ...]]], list[bool]]:
    """The header, the cells and which columns hold numbers, for one dataset's Markdown table. A
    cell of several lines (the members) is a tuple, joined with ``; ``."""
    sel, directions = entry["selection_metric"], entry["directions"]
    header = ["rank", "name", "kind", "level", f"valid {sel} {ARROWS[directions[sel]]}", "valid estimate"]
    header += [f"test {m} {ARROWS[directions[m]]}" for m in entry["metrics"]]
    header += [f"Δ{sel} vs best single [95% CI]", "members", "fit s", "predict s", "MLflow run", "registered"]
    rows = []
    for rank, row in enumerate(entry["rows"], start=1):
        diff = row["test_diff"].get(sel) or {}
        cells = [str(rank), str(row["name"]), str(row["kind"]), str(row["stack_level"]),
                 _with_sd(row, "valid", sel), str(row["valid_estimate"] or MISSING)]
        cells += [_with_sd(row, "test", m) for m in entry["metrics"]]
        cells.append(MISSING if number(diff.get("diff")) is None else
                     f"{rounded(sel, diff.get('diff'), signed=True)} "
                     f"[{rounded(sel, diff.get('low'), signed=True)}, {rounded(sel, diff.get('high'), signed=True)}]")
        cells.append(tuple(f"{m['name']} {m['weight']:.4f}" for m in row["members"]) or MISSING)
        cells += [_seconds(row["fit_seconds"]), _seconds(row["predict_seconds"]),
                  row["mlflow_run_id"] or MISSING, row["registered"] or MISSING]
        rows.append(cells)
    numeric = [h not in ("name", "kind", "valid estimate", "members", "MLflow run", "registered") for h in header]
    return header, rows, numeric


def _with_sd(row: dict, split: str, metric: str) -> str:
    sd = seed_sd(row, split, metric)
    return rounded(metric, row[split].get(metric)) + ("" if sd is None else f" ± {rounded(metric, sd)}")


def _md_cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _seconds(value: Any) -> str:
    found = number(value)
    return MISSING if found is None else f"{found:.2f}"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _check_board(board: Any) -> str:
    """What is wrong with a leaderboard document read from a file ('' when nothing is)."""
    if not isinstance(board, dict):
        return f"expected a JSON object, got {type(board).__name__}"
    missing = [k for k in BOARD_KEYS if k not in board]
    if missing:
        return f"missing {', '.join(missing)}"
    if not isinstance(board["datasets"], list):
        return "'datasets' is not a list"
    for d, entry in enumerate(board["datasets"]):
        where = f"datasets[{d}]"
        if not isinstance(entry, dict):
            return f"{where} is not an object"
        missing = [k for k in DATASET_KEYS if k not in entry]
        if missing:
            return f"{where} is missing {', '.join(missing)}"
        metrics, directions = entry["metrics"], entry["directions"]
        if not isinstance(metrics, list) or not isinstance(directions, dict) or not isinstance(entry["rows"], list):
            return f"{where}: 'metrics' and 'rows' must be lists and 'directions' an object"
        for m in [*metrics, entry["selection_metric"]]:
            if directions.get(m) not in DIRECTIONS:
                return f"{where}: directions[{m!r}] must be one of {', '.join(DIRECTIONS)}"
        for r, row in enumerate(entry["rows"]):
            if not isinstance(row, dict):
                return f"{where}.rows[{r}] is not an object"
            missing = [k for k in ROW_KEYS if k not in row]
            if missing:
                return f"{where}.rows[{r}] is missing {', '.join(missing)}"
            for key in ("valid", "test", "test_diff"):
                if not isinstance(row[key], dict):
                    return f"{where}.rows[{r}].{key} is not an object"
            if not isinstance(row["members"], list) or not all(
                    isinstance(m, dict) and "name" in m and number(m.get("weight")) is not None
                    for m in row["members"]):
                return f"{where}.rows[{r}].members must be a list of {{name, weight}}"
    return ""


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
    text = render(read_board(path), fmt)
    if out is None:
        return text
    if not Path(out).parent.is_dir():
        raise MsaError(f"--out {out}: folder {Path(out).parent} does not exist")
    atomic_write(Path(out), lambda tmp: tmp.write_text(text))
    return None
