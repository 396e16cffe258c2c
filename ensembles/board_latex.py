"""The leaderboard as LaTeX tables of the kind MSA papers print (booktabs; ``\\usepackage{booktabs}``
in the preamble): per dataset, one row per model (its best trial by valid, as the board ranks
them) and per ensemble, the suite's test metrics as papers report them, each column's best in
bold, mean ± sd where a row is a seed group.

MOSI-style suites (CMU-MOSI, CMU-MOSEI) print Acc-2 and F1 as ``has0/non0`` pairs, then MAE,
Corr and Acc-7; CH-SIMS prints Acc-2, Acc-3, Acc-5, F1, MAE and Corr; classification (MIntRec)
Acc, F1, P and R (macro), then WF1 (weighted F1). Other suites print every metric of theirs.
"""
from __future__ import annotations

import dataclasses

from msa.ensembles.board import BoardRow, DatasetBoard, Leaderboard
from msa.ensembles.board_text import metric_label, number, rounded

# Per suite: (column header, the metrics it prints, joined by "/").
COLUMNS = {
    "mosi": [("Acc-2", ("acc2_has0", "acc2_non0")), ("F1", ("f1_has0", "f1_non0")), ("MAE", ("mae",)),
             ("Corr", ("corr",)), ("Acc-7", ("acc7",))],
    "sims": [("Acc-2", ("acc2",)), ("Acc-3", ("acc3",)), ("Acc-5", ("acc5",)), ("F1", ("f1",)), ("MAE", ("mae",)),
             ("Corr", ("corr",))],
    "classification": [("Acc", ("acc",)), ("F1", ("f1_macro",)), ("P", ("precision_macro",)),
                       ("R", ("recall_macro",)), ("WF1", ("f1_weighted",))],
}
ARROWS = {"higher": r"$\uparrow$", "lower": r"$\downarrow$"}
SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
           "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}"}


def escape(text: str) -> str:
    return "".join(SPECIAL.get(character, character) for character in str(text))


def paper_rows(entry: DatasetBoard) -> list[BoardRow]:
    """The rows a paper prints: each model's first (best by valid) member row, then every
    ensemble and the seed ensemble, each part in the board's order (by valid)."""
    seen, models = set(), []
    for row in entry.rows:
        model = str(row.name).split("/", 1)[0]
        if row.stack_level == 0 and model not in seen:
            seen.add(model)
            models.append(row)
    return models + [row for row in entry.rows if row.stack_level != 0]


def row_label(row: BoardRow) -> str:
    if row.kind in ("member", "best single"):
        seeds = row.seeds.count if row.seeds else None
        return str(row.name).split("/", 1)[0] + (f" ({seeds} seeds)" if seeds else "")
    if row.kind == "ensemble":
        return f"stacked ensemble ({row.name})"
    return str(row.name)


def to_latex(board: Leaderboard) -> str:
    """Every dataset's table, one after another."""
    header = [f"% Leaderboard of {board.run_dir} ({board.created}); needs \\usepackage{{booktabs}}"]
    return "\n".join(header + [_table(entry) for entry in board.datasets]) + "\n"


def _table(entry: DatasetBoard) -> str:
    columns = COLUMNS.get(entry.metric_suite, [(metric_label(m), (m,)) for m in entry.metrics])
    columns = [(label, metrics) for label, metrics in columns if all(m in entry.metrics for m in metrics)]
    rows = paper_rows(entry)
    shown = dataclasses.replace(entry, rows=rows)
    best = {m: shown.best_rows("test", m) for _, metrics in columns for m in metrics}
    direction = lambda metrics: ARROWS[entry.directions[metrics[0]]]  # noqa: E731
    lines = [
        r"\begin{table}[t]", r"\centering",
        rf"\caption{{Test results on {escape(entry.dataset)}: models (each its best trial by valid "
        rf"{escape(metric_label(entry.selection_metric))}) and ensembles. "
        + ("Acc-2 and F1 as has0/non0. " if any(len(metrics) > 1 for _, metrics in columns) else "")
        + r"Best in bold; mean $\pm$ sd over seeds where a model was trained with several.}",
        rf"\label{{tab:{escape(entry.dataset).replace(chr(92), '')}}}",
        r"\begin{tabular}{l" + "c" * len(columns) + "}", r"\toprule",
        "Model & " + " & ".join(f"{label} {direction(metrics)}" for label, metrics in columns) + r" \\",
        r"\midrule",
    ]
    ensembles_started = False
    for position, row in enumerate(rows):
        if row.stack_level and not ensembles_started:
            ensembles_started = True
            if position:
                lines.append(r"\midrule")
        cells = ["/".join(_value(row, m, position in best[m]) for m in metrics) for _, metrics in columns]
        lines.append(" & ".join([escape(row_label(row)), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)


def _value(row: BoardRow, metric: str, is_best: bool) -> str:
    value = row.test.get(metric)
    text = rounded(metric, value).replace("−", "-") if number(value) is not None else "--"
    if is_best:
        text = rf"\textbf{{{text}}}"
    sd = row.sd("test", metric)
    return text + (rf"$\pm${rounded(metric, sd)}" if sd is not None else "")
