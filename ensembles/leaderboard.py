"""The leaderboard export: one document, four renderings (CSV, Markdown, JSON, self-contained HTML).

The document is a plain JSON-serialisable dict built by the ensemble job (see ``ensembles/README.md``):
run facts at the top (``run_dir``, ``created``, ``protocol``, ``folds``, ``bootstrap``) and one entry
per dataset with its metric suite, the selection metric, every metric's direction (``"higher"`` or
``"lower"`` is better), the best single model and the rows. The rows arrive ranked by the valid
selection metric and keep that order (rank = position, from 1); test is only reported, never used to
order anything. Each row carries its test metrics and, per metric, the difference to the best single
model on test with a paired-bootstrap 95% interval (``test_diff``).

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

import base64
import csv
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from msa.platform.core.errors import MsaError
from msa.platform.core.files import atomic_write, finite_or_none
from msa.platform.core.run_dir import RunDir
from msa.platform.tracking.plots import pyplot

FORMATS = ("csv", "md", "json", "html")
SUFFIXES = {"csv": ".csv", "md": ".md", "json": ".json", "html": ".html"}
DIRECTIONS = ("higher", "lower")
ARROWS = {"higher": "↑", "lower": "↓"}
MISSING = "–"
RANKING_SENTENCE = "Ranked by the valid selection metric; test is scored once, after everything is fixed."

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
    renderers = {"csv": to_csv, "md": to_markdown, "json": to_json, "html": to_html}
    if fmt not in renderers:
        raise MsaError(f"unknown leaderboard format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return renderers[fmt](board)


def write_all(board: dict, *folders: Path, stem: str = "leaderboard") -> list[dict[str, Path]]:
    """Write ``<stem>.csv``, ``.md``, ``.json`` and ``.html`` into each of `folders`, each atomically.

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
    ``fit_seconds``, ``predict_seconds``, ``mlflow_run_id``, ``registered``.

    Datasets with different metric suites share one table: the metric columns are the union over
    the datasets, in order of first appearance, and a cell is empty where a dataset lacks the
    metric (as it is for an undefined value). Numbers are written at full precision (``repr``).
    """
    datasets = board["datasets"]
    valid_columns = _unique((d["selection_metric"], d["directions"][d["selection_metric"]]) for d in datasets)
    test_columns = _unique((m, d["directions"][m]) for d in datasets for m in d["metrics"])
    diff_metrics = _unique(m for d in datasets for m in d["metrics"])
    header = ["dataset", "rank", "name", "kind", "stack_level"]
    header += [_csv_metric("valid", m, direction) for m, direction in valid_columns]
    header += ["valid_estimate"]
    header += [_csv_metric("test", m, direction) for m, direction in test_columns]
    header += [f"diff_{m}{part}" for m in diff_metrics for part in ("", "_low", "_high")]
    header += ["members", "fit_seconds", "predict_seconds", "mlflow_run_id", "registered"]

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=header, restval="")
    writer.writeheader()
    for entry in datasets:
        sel, directions = entry["selection_metric"], entry["directions"]
        for rank, row in enumerate(entry["rows"], start=1):
            record: dict[str, str] = {
                "dataset": entry["dataset"], "rank": str(rank), "name": row["name"], "kind": row["kind"],
                "stack_level": _csv_value(row["stack_level"]),
                _csv_metric("valid", sel, directions[sel]): _csv_value(row["valid"].get(sel)),
                "valid_estimate": row["valid_estimate"],
                "members": "; ".join(f"{m['name']}:{m['weight']:.4f}" for m in row["members"]),
                "fit_seconds": _csv_value(row["fit_seconds"]),
                "predict_seconds": _csv_value(row["predict_seconds"]),
                "mlflow_run_id": row["mlflow_run_id"] or "", "registered": row["registered"] or "",
            }
            for m in entry["metrics"]:
                record[_csv_metric("test", m, directions[m])] = _csv_value(row["test"].get(m))
                diff = row["test_diff"].get(m) or {}
                for part, key in (("", "diff"), ("_low", "low"), ("_high", "high")):
                    record[f"diff_{m}{part}"] = _csv_value(diff.get(key))
            writer.writerow(record)
    return out.getvalue()


def _csv_metric(split: str, metric: str, direction: str) -> str:
    return f"{split}_{metric} ({direction} is better)"


def _csv_value(value: Any) -> str:
    number = _number(value)
    if number is None:
        return "" if value is None or isinstance(value, float) else str(value)
    return repr(number)


# --------------------------------------------------------------------------------------------
# Markdown and HTML: one table model, two renderings
# --------------------------------------------------------------------------------------------


def to_markdown(board: dict) -> str:
    """A header (run, protocol, folds, created, bootstrap), the ranking sentence, a legend, then per
    dataset a ``## <dataset>`` section with one table. Numbers to 4 decimals, undefined as ``–``."""
    lines = ["# Leaderboard", ""]
    lines += [f"- {label}: {value}" for label, value in _facts(board)]
    lines += ["", RANKING_SENTENCE, "", _legend(board)]
    for entry in board["datasets"]:
        header, rows, numeric = _table(entry)
        lines += ["", f"## {_md_cell(entry['dataset'])}", "", _intro(entry), ""]
        lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
        lines.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
        lines += ["| " + " | ".join(_md_cell(c if isinstance(c, str) else "; ".join(c)) for c in row) + " |"
                  for row in rows]
    return "\n".join(lines) + "\n"


def to_html(board: dict) -> str:
    """One self-contained page: inline CSS, no script, no external resource. The same content as
    `to_markdown`, plus each dataset's `chart_png` embedded as a ``data:image/png;base64`` image."""
    esc = html.escape
    title = f"Leaderboard: {Path(str(board['run_dir'])).name or board['run_dir']}"
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{esc(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
        "<h1>Leaderboard</h1>", "<ul>",
        *[f"<li><strong>{esc(label)}:</strong> {esc(str(value))}</li>" for label, value in _facts(board)],
        "</ul>", f"<p>{esc(RANKING_SENTENCE)}</p>", f'<p class="legend">{esc(_legend(board))}</p>',
    ]
    for entry in board["datasets"]:
        header, rows, numeric = _table(entry)
        sel = entry["selection_metric"]
        alt = (f"Bar chart: test {sel} of each row minus the best single model "
               f"({entry['best_single']}) on {entry['dataset']}, with 95% intervals")
        png = base64.b64encode(chart_png(entry)).decode("ascii")
        parts += [
            "<section>", f"<h2>{esc(str(entry['dataset']))}</h2>", f"<p>{esc(_intro(entry))}</p>",
            '<div class="scroll"><table>', "<thead><tr>",
            *[f'<th scope="col">{esc(h)}</th>' for h in header],
            "</tr></thead>", "<tbody>",
            *["<tr>" + "".join(f'<td class="{"num" if n else "text"}">{_html_cell(c)}</td>'
                               for c, n in zip(row, numeric)) + "</tr>" for row in rows],
            "</tbody>", "</table></div>",
            f'<figure><img src="data:image/png;base64,{png}" alt="{esc(alt)}">'
            f"<figcaption>{esc(alt)}</figcaption></figure>",
            "</section>",
        ]
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


_CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em;color:#1a1a1a}"
    "table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0 1em}"
    "th,td{border:1px solid #c8c8c8;padding:0.25em 0.5em}"
    "th{background:#eef1f5;text-align:left}"
    "td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}"
    "td.text{white-space:nowrap}.scroll{overflow-x:auto}"
    "tbody tr:nth-child(even){background:#f8f9fb}"
    ".legend{color:#444;font-size:0.9em}"
    "figure{margin:0}img{max-width:100%}figcaption{color:#555;font-size:0.85em}"
)

def _table(entry: dict) -> tuple[list[str], list[list[str | tuple[str, ...]]], list[bool]]:
    """The header, the cells and which columns hold numbers, for one dataset's table (shared by
    Markdown and HTML). A cell of several lines (the members) is a tuple: Markdown joins it with
    ``; ``, HTML with line breaks."""
    sel, directions = entry["selection_metric"], entry["directions"]
    header = ["rank", "name", "kind", "level", f"valid {sel} {ARROWS[directions[sel]]}", "valid estimate"]
    header += [f"test {m} {ARROWS[directions[m]]}" for m in entry["metrics"]]
    header += [f"Δ{sel} vs best single [95% CI]", "members", "fit s", "predict s", "MLflow run", "registered"]
    rows = []
    for rank, row in enumerate(entry["rows"], start=1):
        diff = row["test_diff"].get(sel) or {}
        cells = [str(rank), str(row["name"]), str(row["kind"]), str(row["stack_level"]),
                 _fixed(row["valid"].get(sel)), str(row["valid_estimate"] or MISSING)]
        cells += [_fixed(row["test"].get(m)) for m in entry["metrics"]]
        cells.append(MISSING if _number(diff.get("diff")) is None else
                     f"{_fixed(diff.get('diff'))} [{_fixed(diff.get('low'))}, {_fixed(diff.get('high'))}]")
        cells.append(tuple(f"{m['name']} {m['weight']:.4f}" for m in row["members"]) or MISSING)
        cells += [_fixed(row["fit_seconds"]), _fixed(row["predict_seconds"]),
                  row["mlflow_run_id"] or MISSING, row["registered"] or MISSING]
        rows.append(cells)
    numeric = [h not in ("name", "kind", "valid estimate", "members", "MLflow run", "registered") for h in header]
    return header, rows, numeric


def _facts(board: dict) -> list[tuple[str, Any]]:
    return [("Run", board["run_dir"]), ("Protocol", board["protocol"]), ("Folds", board["folds"]),
            ("Created", board["created"]), ("Bootstrap resamples", board["bootstrap"])]


def _legend(board: dict) -> str:
    return (f"↑ higher is better, ↓ lower is better. Δ is the row's test score minus the best single "
            f"model's on the selection metric, with its paired-bootstrap 95% interval "
            f"({board['bootstrap']} resamples) in brackets; an interval that excludes 0 is a difference "
            f"the bootstrap resolves. {MISSING} marks an undefined value.")


def _intro(entry: dict) -> str:
    sel = entry["selection_metric"]
    direction = entry["directions"][sel]
    better = "negative" if direction == "lower" else "positive"
    return (f"Task {entry['task']} (metric suite {entry['metric_suite']}); ranked by valid {sel} "
            f"({direction} is better); best single model: {entry['best_single']}. "
            f"A {better} Δ{sel} beats the best single model.")


def _md_cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _html_cell(cell: str | tuple[str, ...]) -> str:
    return html.escape(cell) if isinstance(cell, str) else "<br>".join(html.escape(line) for line in cell)


def _fixed(value: Any) -> str:
    number = _number(value)
    return MISSING if number is None else f"{number:.4f}"


# --------------------------------------------------------------------------------------------
# Chart
# --------------------------------------------------------------------------------------------


def chart_png(dataset_entry: dict) -> bytes:
    """Horizontal bars of each row's test difference to the best single model on the selection
    metric, with the 95% interval as error bars and a zero line; rows in rank order from the top,
    rows without a difference left out. Returns the PNG bytes."""
    sel = dataset_entry["selection_metric"]
    direction = dataset_entry["directions"][sel]
    points = []
    for row in dataset_entry["rows"]:
        diff = row["test_diff"].get(sel) or {}
        value = _number(diff.get("diff"))
        if value is not None:
            low, high = _number(diff.get("low")), _number(diff.get("high"))
            label = f"{row['name']} (best single)" if row["name"] == dataset_entry["best_single"] else str(row["name"])
            points.append((label.replace("$", r"\$"), value, low, high))  # no mathtext in names

    plt = pyplot()
    figure, axes = plt.subplots(figsize=(8, 1.5 + 0.4 * max(len(points), 1)))
    try:
        if points:
            names = [p[0] for p in points]
            values = [p[1] for p in points]
            below = [max(value - low, 0.0) if low is not None else 0.0 for _, value, low, _ in points]
            above = [max(high - value, 0.0) if high is not None else 0.0 for _, value, _, high in points]
            better = [(v < 0) if direction == "lower" else (v > 0) for v in values]
            colours = ["#3a7d44" if b else ("#9e9e9e" if v == 0 else "#b5473a") for b, v in zip(better, values)]
            positions = range(len(points))
            axes.barh(positions, values, xerr=[below, above], color=colours, capsize=3,
                      error_kw={"elinewidth": 1, "ecolor": "#222222"})
            axes.set_yticks(list(positions), labels=names)
            axes.invert_yaxis()
        else:
            axes.text(0.5, 0.5, "no test differences to plot", ha="center", va="center", transform=axes.transAxes)
            axes.set_yticks([])
        axes.axvline(0.0, color="black", linewidth=1)
        axes.set_xlabel(f"test {sel}: row minus best single model\n"
                        f"whiskers: 95% bootstrap interval; green: better, red: worse")
        axes.set_title(f"{dataset_entry['dataset']}: test Δ{sel} vs best single ({direction} is better)"
                       .replace("$", r"\$"))
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(figure)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _number(value: Any) -> float | int | None:
    """A finite number, or None for None, NaN, infinities and anything that is not a number."""
    if value is None or isinstance(value, (bool, str)):
        return None
    if isinstance(value, int):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _unique(items) -> list:
    return list(dict.fromkeys(items))


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
                    isinstance(m, dict) and "name" in m and _number(m.get("weight")) is not None
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
