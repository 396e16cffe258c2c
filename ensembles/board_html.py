"""The leaderboard as one self-contained HTML page (inline CSS, no script, no external
resource) that fits one 1400 px screen: numbers rounded per metric (accuracies and F1 to one
decimal, MAE and Corr to three), mean ± sd where a row is a seed group, the best value of each
metric column in bold, an ensemble's members and weights folded (``<details>``), and each
dataset's chart of test differences embedded as a PNG. Its full-precision twin is the JSON
(`leaderboard.py`); it reads a `board.Leaderboard`."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from msa.ensembles.board import BoardRow, DatasetBoard, Leaderboard
from msa.ensembles.board_text import (
    ARROWS,
    MISSING,
    RANKING_SENTENCE,
    facts,
    intro,
    legend,
    metric_label,
    number,
    rounded,
    unique,
)
from msa.platform.tracking.plots import pyplot

_CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:1em;color:#1a1a1a}"
    "table{border-collapse:collapse;font-size:0.78em;margin:0.5em 0 0.3em}"
    "th,td{border:1px solid #c8c8c8;padding:0.2em 0.25em;vertical-align:top}"
    "th{background:#eef1f5;text-align:left;font-weight:600}"
    "td{white-space:nowrap}td.num{text-align:right;font-variant-numeric:tabular-nums}"
    "td.best{background:#e3f1e5}td.best strong{font-weight:700}"
    ".sd,.ci{color:#555;font-size:0.8em}"
    "details summary{cursor:pointer;color:#234}details ol{margin:0.2em 0 0;padding-left:1.4em}"
    "tbody tr:nth-child(even){background:#f8f9fb}"
    ".legend,.note{color:#444;font-size:0.9em}"
    "figure{margin:0}img{max-width:100%}figcaption{color:#555;font-size:0.85em}"
)


def to_html(board: Leaderboard) -> str:
    """The page: run facts, the ranking sentence and legend, then per dataset its table, a note
    on how each kind of row's valid score was estimated, and its chart."""
    esc = html.escape
    title = f"Leaderboard: {Path(str(board.run_dir)).name or board.run_dir}"
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{esc(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
        "<h1>Leaderboard</h1>", "<ul>",
        *[f"<li><strong>{esc(label)}:</strong> {esc(str(value))}</li>" for label, value in facts(board)],
        "</ul>", f"<p>{esc(RANKING_SENTENCE)}</p>", f'<p class="legend">{esc(legend(board))}</p>',
    ]
    for entry in board.datasets:
        sel = entry.selection_metric
        alt = (f"Bar chart: test {sel} of each row minus the best single model "
               f"({entry.best_single}) on {entry.dataset}, with 95% intervals")
        png = base64.b64encode(chart_png(entry)).decode("ascii")
        estimates = unique((row.kind, row.valid_estimate) for row in entry.rows if row.valid_estimate)
        parts += [
            "<section>", f"<h2>{esc(str(entry.dataset))}</h2>", f"<p>{esc(intro(entry))}</p>",
            _table(entry),
            '<p class="note">Valid scores: ' + "; ".join(f"{esc(kind)}: {esc(text)}" for kind, text in estimates)
            + ". Mean ± sd: over a seed group's seeds (its Δ compares the seeds' mean prediction). Registered: "
            "the version in the model registry (msa-&lt;model&gt;-&lt;dataset&gt; or msa-ensemble-&lt;dataset&gt;; "
            "its full name on hover).</p>",
            f'<figure><img src="data:image/png;base64,{png}" alt="{esc(alt)}">'
            f"<figcaption>{esc(alt)}</figcaption></figure>",
            "</section>",
        ]
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


def table_header(entry: DatasetBoard) -> list[str]:
    """The table's column headers, in order."""
    sel, directions = entry.selection_metric, entry.directions
    return ["#", "name", "kind", f"valid {metric_label(sel)} {ARROWS[directions[sel]]}",
            *[f"test {metric_label(m)} {ARROWS[directions[m]]}" for m in entry.metrics],
            f"Δ{metric_label(sel)} vs best single [95% CI]", "members", "fit s", "predict ms", "registered"]


def _table(entry: DatasetBoard) -> str:
    esc = html.escape
    sel = entry.selection_metric
    best = {("valid", sel): entry.best_rows("valid", sel),
            **{("test", m): entry.best_rows("test", m) for m in entry.metrics}}
    lines = ["<table>", "<thead><tr>" + "".join(f'<th scope="col">{esc(h)}</th>' for h in table_header(entry))
             + "</tr></thead>", "<tbody>"]
    for position, row in enumerate(entry.rows):
        run = f' title="MLflow run {esc(row.mlflow_run_id)}"' if row.mlflow_run_id else ""
        cells = [f'<td class="num">{position + 1}</td>', f"<td{run}>{esc(str(row.name))}</td>",
                 f"<td>{esc(str(row.kind))}</td>",
                 _score(row, "valid", sel, position in best[("valid", sel)], title=row.valid_estimate)]
        cells += [_score(row, "test", m, position in best[("test", m)]) for m in entry.metrics]
        cells += [f'<td class="num">{_difference(row, sel)}</td>', f"<td>{_members(row)}</td>",
                  f'<td class="num">{esc(_seconds(row.fit_seconds))}</td>',
                  f'<td class="num">{esc(_seconds(row.predict_seconds, 1000))}</td>', _registered(row)]
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines += ["</tbody>", "</table>"]
    return "\n".join(lines)


def _score(row: BoardRow, split: str, metric: str, is_best: bool, title: str = "") -> str:
    text = html.escape(rounded(metric, row.score(split, metric)))
    if is_best:
        text = f"<strong>{text}</strong>"
    sd = row.sd(split, metric)
    if sd is not None:
        text += f'<span class="sd"> ±{html.escape(rounded(metric, sd))}</span>'
    tip = f' title="{html.escape(title)}"' if title else ""
    return f'<td class="num{" best" if is_best else ""}"{tip}>{text}</td>'


def _difference(row: BoardRow, sel: str) -> str:
    diff = row.diff(sel)
    if not diff.defined:
        return MISSING
    return (f"{html.escape(rounded(sel, diff.diff, signed=True))} <span class=\"ci\">"
            f"[{html.escape(rounded(sel, diff.low, signed=True))}, "
            f"{html.escape(rounded(sel, diff.high, signed=True))}]</span>")


def _members(row: BoardRow) -> str:
    """A row's members and weights, folded; a row that is its own one member shows none."""
    members = row.members
    if not members or (len(members) == 1 and members[0].name == row.name):
        return MISSING
    items = "".join(f"<li>{html.escape(str(m.name))} {m.weight:.3f}</li>" for m in members)
    return f"<details><summary>{len(members)} members</summary><ol>{items}</ol></details>"


def _seconds(value, scale: float = 1.0) -> str:
    found = number(value)
    return MISSING if found is None else f"{found * scale:.3g}"


def _registered(row: BoardRow) -> str:
    """The registry versions a row is (``name@version, ...``), shown as ``v<version>``; the full
    names in its tooltip."""
    if not row.registered:
        return f"<td>{MISSING}</td>"
    versions = [entry.strip() for entry in str(row.registered).split(",")]
    shown = ", ".join("v" + entry.rpartition("@")[2] for entry in versions)
    return f'<td title="{html.escape(", ".join(versions))}">{html.escape(shown)}</td>'



def chart_png(dataset_entry: DatasetBoard) -> bytes:
    """Horizontal bars of each row's test difference to the best single model on the selection
    metric, with the 95% interval as error bars and a zero line; rows in rank order from the top,
    rows without a difference left out. Returns the PNG bytes."""
    sel = dataset_entry.selection_metric
    direction = dataset_entry.directions[sel]
    points = []
    for row in dataset_entry.rows:
        diff = row.diff(sel)
        value = number(diff.diff)
        if value is not None:
            low, high = number(diff.low), number(diff.high)
            label = f"{row.name} (best single)" if row.name == dataset_entry.best_single else str(row.name)
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
        axes.set_title(f"{dataset_entry.dataset}: test Δ{sel} vs best single ({direction} is better)"
                       .replace("$", r"\$"))
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(figure)
    return buffer.getvalue()
