"""Tests for ``msa.ensembles.leaderboard``: the four renderings of one leaderboard document.

One realistic document (a MOSI-suite regression dataset and a classification dataset, every row
kind, undefined values as None and as NaN, full-precision floats, a name that needs HTML escaping)
is rendered to CSV, JSON and Markdown, and each rendering is parsed back independently (csv,
json, splitting Markdown lines on ``|``) and compared number by number with the document. The
HTML page is opened in headless Chromium: a checker page served beside it on 127.0.0.1 loads it
in an iframe and writes what Chromium built (tables, header texts, row counts, decoded image
sizes) into its own DOM, which ``--dump-dom`` returns; a ``--screenshot`` of the page must not be
blank. The Chromium tests skip, saying why, where /usr/bin/chromium is absent. Nothing is mocked.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import html
import io
import json
import math
import random
import re
import shutil
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from msa.ensembles.board import Leaderboard, Member
from msa.ensembles.board_console import to_console
from msa.ensembles.board_html import chart_png, table_header
from msa.ensembles.board_latex import paper_rows, to_latex
from msa.ensembles.board_text import metric_label, rounded
from msa.ensembles.leaderboard import (
    FORMATS,
    RANKING_SENTENCE,
    render,
    to_csv,
    to_html,
    to_json,
    to_markdown,
    write_all,
)
from msa.platform.core.errors import MsaError

MOSI_METRICS = ["acc2_has0", "f1_has0", "acc2_non0", "f1_non0", "acc5", "acc7", "mae", "corr"]
CLASS_METRICS = ["acc", "f1_macro", "precision_macro", "recall_macro"]
ARROW = {"higher": "↑", "lower": "↓"}
ESCAPED_NAME = 'mean <all & "3">'
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


# --------------------------------------------------------------------------------------------
# The document
# --------------------------------------------------------------------------------------------


def make_row(rng: random.Random, name: str, kind: str, metrics: list[str], sel: str, *, level: int,
             members: list[tuple[str, float]], undefined: tuple[str, ...] = (), nan: tuple[str, ...] = (),
             no_diff: tuple[str, ...] = (), best: bool = False, mlflow: str = "", registered: str = "") -> dict:
    """One row with full-precision random metrics; `undefined` metrics are None, `nan` ones NaN,
    `no_diff` metrics have no difference (None entry or None numbers), `best` has zero diffs."""
    def value(m: str) -> float | None:
        if m in undefined:
            return None
        if m in nan:
            return math.nan
        return rng.uniform(0.2, 1.2) if m in ("mae", "corr") else rng.uniform(40.0, 90.0)

    diffs: dict = {}
    for i, m in enumerate(metrics):
        if best:
            diffs[m] = {"diff": 0.0, "low": 0.0, "high": 0.0}
        elif m in no_diff:
            diffs[m] = None if i % 2 else {"diff": None, "low": None, "high": None}
        else:
            scale = 1.0 if m in ("mae", "corr") else 60.0  # accuracies and F1 are percentages
            d = scale * rng.uniform(-0.05, 0.05)
            diffs[m] = {"diff": d, "low": d - scale * rng.uniform(0.001, 0.03),
                        "high": d + scale * rng.uniform(0.001, 0.03)}
    return {
        "name": name, "kind": kind, "stack_level": level,
        "valid": {sel: rng.uniform(0.5, 0.9) if sel == "mae" else rng.uniform(50.0, 80.0)},
        "valid_estimate": "cross-fitted, 5 grouped folds" if level else "valid split",
        "test": {m: value(m) for m in metrics},
        "test_diff": diffs,
        "members": [{"name": n, "weight": w} for n, w in members],
        "fit_seconds": rng.uniform(0.01, 3.0), "predict_seconds": rng.uniform(1e-4, 1e-2),
        "mlflow_run_id": mlflow, "registered": registered,
    }


def ranked(rows: list[dict], sel: str, direction: str) -> list[dict]:
    """The rows with their valid values reassigned so that the given order is the ranking."""
    values = sorted((row["valid"][sel] for row in rows), reverse=direction == "higher")
    return [{**row, "valid": {sel: value}} for row, value in zip(rows, values)]


def make_board() -> dict:
    rng = random.Random(20261125)
    reg_best, reg_other = "baseline/3f2a1_00001", "tfn/77aa_00003"
    regression_rows = [
        make_row(rng, "caruana", "ensemble", MOSI_METRICS, "mae", level=1,
                 members=[(reg_best, 0.6), (reg_other, 0.4)], mlflow="a1b2c3d4e5f6",
                 registered="msa-ensemble-synth_regression@1"),
        make_row(rng, "baseline seeds", "seed ensemble", MOSI_METRICS, "mae", level=1,
                 members=[(reg_best, 1 / 3), ("baseline/3f2a1_00001_seed1", 1 / 3),
                          ("baseline/3f2a1_00001_seed2", 1 / 3)], undefined=("acc2_non0", "f1_non0"),
                 mlflow="0f0f0f0f"),
        make_row(rng, reg_best, "best single", MOSI_METRICS, "mae", level=0, members=[(reg_best, 1.0)],
                 best=True, mlflow="5e5e5e5e", registered="msa-synth_regression@3"),
        make_row(rng, "nnls", "ensemble", MOSI_METRICS, "mae", level=1,
                 members=[(reg_best, 0.7123456), (reg_other, 0.2876544)], nan=("corr",), no_diff=("corr", "mae")),
        make_row(rng, reg_other, "member", MOSI_METRICS, "mae", level=0, members=[(reg_other, 1.0)],
                 undefined=("acc7",), no_diff=("acc7",)),
    ]
    cls_best = "mult/9c1d_00002"
    classification_rows = [
        make_row(rng, cls_best, "best single", CLASS_METRICS, "acc", level=0, members=[(cls_best, 1.0)],
                 best=True, mlflow="77cc", registered="msa-synth_classification@1"),
        make_row(rng, ESCAPED_NAME, "ensemble", CLASS_METRICS, "acc", level=1,
                 members=[(cls_best, 0.5), ("misa/0a0a_00000", 0.5)], undefined=("f1_macro",), mlflow="88dd"),
        make_row(rng, "misa/0a0a_00000", "member", CLASS_METRICS, "acc", level=0,
                 members=[("misa/0a0a_00000", 1.0)], no_diff=("acc",)),
    ]
    return {
        "run_dir": "/abs/path/runs/sweeps/demo-20261125-190000",
        "created": "2026-11-25T19:00:00Z", "protocol": "crossfit", "folds": 5, "bootstrap": 1000,
        "datasets": [
            {"dataset": "synth_regression", "metric_suite": "mosi", "task": "regression", "selection_metric": "mae",
             "metrics": MOSI_METRICS, "directions": {m: ("lower" if m == "mae" else "higher") for m in MOSI_METRICS},
             "best_single": reg_best, "rows": ranked(regression_rows, "mae", "lower")},
            {"dataset": "synth_classification", "metric_suite": "classification", "task": "classification",
             "selection_metric": "acc", "metrics": CLASS_METRICS, "directions": {m: "higher" for m in CLASS_METRICS},
             "best_single": cls_best, "rows": ranked(classification_rows, "acc", "higher")},
        ],
    }


@pytest.fixture(scope="module")
def board() -> dict:
    """The document as JSON holds it: what the tests expect; `typed(board)` is what the renderers read."""
    return make_board()


def typed(document: dict) -> Leaderboard:
    return Leaderboard.from_dict(document)


def defined(value):
    """What every rendering shows for a document value: None for None and NaN."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def diff_of(row: dict, metric: str) -> dict:
    return row["test_diff"][metric] or {"diff": None, "low": None, "high": None}


# Decimals a reader of each metric expects (independent of the module): accuracies and F1 are
# percentages, to 1 decimal; MAE and Corr to 3.
PLACES = {"mae": 3, "corr": 3}


def shown(metric: str, value, *, signed: bool = False) -> str:
    """A metric value as the Markdown (and HTML) show it: rounded per metric, a true minus sign."""
    value = defined(value)
    if value is None:
        return "–"
    return f"{value:{'+' if signed else ''}.{PLACES.get(metric, 1)}f}".replace("-", "−")


def csv_rounded(metric: str, value):
    """A metric value as the CSV holds it, read back: rounded per metric."""
    value = defined(value)
    return None if value is None else round(value, PLACES.get(metric, 1))


def each_row(board: dict):
    for entry in board["datasets"]:
        for rank, row in enumerate(entry["rows"], start=1):
            yield entry, rank, row


# --------------------------------------------------------------------------------------------
# Parsers for the renderings (independent of the module)
# --------------------------------------------------------------------------------------------


def csv_column(header: list[str], prefix: str) -> str:
    """The one header starting with `prefix` followed by a space (``test_mae`` -> ``test_mae (...)``)."""
    matches = [h for h in header if h.startswith(prefix + " (")]
    assert len(matches) == 1, (prefix, matches)
    return matches[0]


def csv_number(cell: str):
    return None if cell == "" else float(cell)


def markdown_tables(text: str) -> dict[str, tuple[list[str], list[list[str]]]]:
    """``## <dataset>`` -> (header cells, body rows' cells) of the table in that section."""
    tables: dict[str, tuple[list[str], list[list[str]]]] = {}
    section = None
    for line in text.splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("|") and section is not None:
            cells = [c.strip() for c in line.strip()[1:-1].split("|")]
            if section not in tables:
                tables[section] = (cells, [])
            elif not all(set(c) <= set("-:") for c in cells):
                tables[section][1].append(cells)
    return tables


# --------------------------------------------------------------------------------------------
# CSV, JSON and Markdown agree with the document
# --------------------------------------------------------------------------------------------


def test_csv_json_markdown_hold_the_same_numbers(board):
    csv_rows = list(csv.DictReader(io.StringIO(to_csv(typed(board)))))
    csv_header = list(csv_rows[0].keys())
    parsed = json.loads(to_json(typed(board)))
    md = markdown_tables(to_markdown(typed(board)))

    assert [(r["dataset"], r["rank"], r["name"]) for r in csv_rows] == [
        (e["dataset"], str(rank), row["name"]) for e, rank, row in each_row(board)]
    assert set(md) == {e["dataset"] for e in board["datasets"]}
    checked = 0
    for (entry, rank, row), csv_row in zip(each_row(board), csv_rows):
        sel = entry["selection_metric"]
        json_row = next(d for d in parsed["datasets"] if d["dataset"] == entry["dataset"])["rows"][rank - 1]
        md_header, md_rows = md[entry["dataset"]]
        md_row = dict(zip(md_header, md_rows[rank - 1], strict=True))
        assert len(md_rows) == len(entry["rows"])
        assert (md_row["rank"], md_row["name"], md_row["kind"], md_row["level"]) == (
            str(rank), row["name"], row["kind"], str(row["stack_level"]))
        assert (csv_row["kind"], int(csv_row["stack_level"])) == (row["kind"], row["stack_level"])
        assert json_row["name"] == row["name"] and json_row["kind"] == row["kind"]

        # the valid selection metric
        expected = defined(row["valid"][sel])
        assert csv_number(csv_row[csv_column(csv_header, f"valid_{sel}")]) == csv_rounded(sel, expected)
        assert json_row["valid"][sel] == expected
        assert md_row[f"valid {sel} {ARROW[entry['directions'][sel]]}"] == shown(sel, expected)

        for m in entry["metrics"]:
            expected = defined(row["test"][m])
            assert csv_number(csv_row[csv_column(csv_header, f"test_{m}")]) == csv_rounded(m, expected), (row["name"], m)
            assert json_row["test"][m] == expected, (row["name"], m)
            assert md_row[f"test {m} {ARROW[entry['directions'][m]]}"] == shown(m, expected), (row["name"], m)
            want = {k: defined(v) for k, v in diff_of(row, m).items()}
            got_csv = {k: csv_number(csv_row[f"diff_{m}{suffix}"])
                       for k, suffix in (("diff", ""), ("low", "_low"), ("high", "_high"))}
            assert got_csv == {k: csv_rounded(m, v) for k, v in want.items()}, (row["name"], m)
            assert (json_row["test_diff"][m] or {"diff": None, "low": None, "high": None}) == want
            checked += 1

        # the difference on the selection metric, Markdown: "d [low, high]"
        cell = md_row[f"Δ{sel} vs best single [95% CI]"]
        want = diff_of(row, sel)
        if defined(want["diff"]) is None:
            assert cell == "–"
        else:
            assert cell == (f"{shown(sel, want['diff'], signed=True)} "
                            f"[{shown(sel, want['low'], signed=True)}, {shown(sel, want['high'], signed=True)}]")
            places = PLACES.get(sel, 1)
            number = rf"([+−]?\d+\.\d{{{places}}})"
            match = re.fullmatch(rf"{number} \[{number}, {number}\]", cell)
            assert match and abs(float(match[1].replace("−", "-")) - want["diff"]) <= 0.5 * 10 ** -places

        for key, column in (("fit_seconds", "fit s"), ("predict_seconds", "predict s")):
            assert csv_number(csv_row[key]) == round(row[key], 2) and row[key] == json_row[key]
            assert md_row[column] == f"{row[key]:.2f}"
    assert checked == sum(len(e["metrics"]) * len(e["rows"]) for e in board["datasets"])


def test_csv_numbers_are_rounded_per_metric_and_lacking_metrics_are_empty(board):
    rows = list(csv.DictReader(io.StringIO(to_csv(typed(board)))))
    caruana = rows[0]
    row = board["datasets"][0]["rows"][0]
    assert caruana["test_mae (lower is better)"] == f"{row['test']['mae']:.3f}"
    assert caruana["test_acc2_has0 (higher is better)"] == f"{row['test']['acc2_has0']:.1f}"
    assert json.loads(to_json(typed(board)))["datasets"][0]["rows"][0]["test"]["mae"] == row["test"]["mae"]  # JSON: full
    # the union of columns: a classification row has no MOSI metric and vice versa
    classification = rows[-1]
    assert classification["dataset"] == "synth_classification"
    assert classification["test_mae (lower is better)"] == "" and classification["diff_corr_high"] == ""
    assert classification["valid_mae (lower is better)"] == ""
    assert caruana["test_acc (higher is better)"] == "" and caruana["valid_acc (higher is better)"] == ""


def test_members_mlflow_and_registered_agree(board):
    csv_rows = list(csv.DictReader(io.StringIO(to_csv(typed(board)))))
    parsed = json.loads(to_json(typed(board)))
    json_rows = [row for d in parsed["datasets"] for row in d["rows"]]
    md = markdown_tables(to_markdown(typed(board)))
    for (entry, rank, row), csv_row, json_row in zip(each_row(board), csv_rows, json_rows, strict=True):
        header, md_rows = md[entry["dataset"]]
        md_row = dict(zip(header, md_rows[rank - 1]))
        members = [(m["name"], m["weight"]) for m in row["members"]]

        assert json_row["members"] == row["members"]
        from_csv = [item.rsplit(":", 1) for item in csv_row["members"].split("; ")]
        assert [name for name, _ in from_csv] == [name for name, _ in members]
        assert [w for _, w in from_csv] == [f"{w:.4f}" for _, w in members]
        from_md = [item.rsplit(" ", 1) for item in md_row["members"].split("; ")]
        assert [(name, float(w)) for name, w in from_md] == [(n, round(w, 4)) for n, w in members]

        assert csv_row["registered"] == json_row["registered"] == row["registered"]
        assert md_row["registered"] == (row["registered"] or "–")
        assert csv_row["mlflow_run_id"] == json_row["mlflow_run_id"] == row["mlflow_run_id"]
        assert md_row["MLflow run"] == (row["mlflow_run_id"] or "–")
        assert csv_row["valid_estimate"] == md_row["valid estimate"] == row["valid_estimate"]
    best = board["datasets"][0]["rows"][2]
    assert best["kind"] == "best single" and csv_rows[2]["members"] == f"{best['name']}:1.0000"


# --------------------------------------------------------------------------------------------
# Direction labels and the Markdown header
# --------------------------------------------------------------------------------------------


def test_every_csv_metric_header_names_its_direction(board):
    header = next(csv.reader(io.StringIO(to_csv(typed(board)))))
    directions = {}
    for entry in board["datasets"]:
        directions.update(entry["directions"])
    labelled = [h for h in header if h.startswith(("valid_", "test_")) and h != "valid_estimate"]
    assert len(labelled) == len(MOSI_METRICS) + len(CLASS_METRICS) + 2  # test metrics + valid mae, valid acc
    for column in labelled:
        match = re.fullmatch(r"(valid|test)_(\w+) \((higher|lower) is better\)", column)
        assert match, column
        assert match[3] == directions[match[2]], column
    assert "test_mae (lower is better)" in header and "test_corr (higher is better)" in header
    assert "valid_mae (lower is better)" in header and "valid_acc (higher is better)" in header
    for m in directions:
        assert {f"diff_{m}", f"diff_{m}_low", f"diff_{m}_high"} <= set(header)


def test_markdown_headers_carry_arrows_and_the_page_explains_them(board):
    text = to_markdown(typed(board))
    tables = markdown_tables(text)
    for entry in board["datasets"]:
        header, _ = tables[entry["dataset"]]
        sel = entry["selection_metric"]
        assert f"valid {sel} {ARROW[entry['directions'][sel]]}" in header
        for m in entry["metrics"]:
            expected = f"test {m} {ARROW[entry['directions'][m]]}"
            wrong = f"test {m} {ARROW['lower' if entry['directions'][m] == 'higher' else 'higher']}"
            assert expected in header and wrong not in header
        assert header[:4] == ["rank", "name", "kind", "level"]
        assert f"Δ{sel} vs best single [95% CI]" in header
        assert header[-6:] == [f"Δ{sel} vs best single [95% CI]", "members", "fit s", "predict s",
                               "MLflow run", "registered"]
    assert "test mae ↓" in tables["synth_regression"][0] and "test corr ↑" in tables["synth_regression"][0]
    assert RANKING_SENTENCE == "Ranked by the valid selection metric; test is scored once, after everything is fixed."
    assert RANKING_SENTENCE in text
    assert "↑ higher is better, ↓ lower is better" in text and "95% interval" in text
    for fact in (board["run_dir"], board["protocol"], board["created"]):
        assert fact in text
    assert re.search(r"Folds: 5\b", text)
    assert text.index("## synth_regression") < text.index("## synth_classification")


def test_json_writes_nan_as_null_and_is_strict_json(board):
    text = to_json(typed(board))
    assert "NaN" not in text and "Infinity" not in text
    parsed = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    nnls = parsed["datasets"][0]["rows"][3]
    assert nnls["name"] == "nnls" and nnls["test"]["corr"] is None
    assert text.startswith('{\n  "run_dir"')
    # numpy scalars (what a meta-learner hands back) are written as plain numbers
    numpy_board = json.loads(to_json(dataclasses.replace(typed(board), folds=np.int64(5), bootstrap=np.float32(1000.0))))
    assert numpy_board["folds"] == 5 and numpy_board["bootstrap"] == 1000.0


# --------------------------------------------------------------------------------------------
# Files, dispatch, errors
# --------------------------------------------------------------------------------------------


def test_write_all_writes_five_files_atomically_and_the_json_reads_back_as_the_same_record(board, tmp_path):
    folder = tmp_path / "out" / "leaderboard"
    (paths,) = write_all(typed(board), folder)
    assert set(paths) == set(FORMATS)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["leaderboard.csv", "leaderboard.md", "leaderboard.json", "leaderboard.html", "leaderboard.tex"])  # no *.partial
    for fmt, path in paths.items():
        assert path.parent == folder
        assert path.read_bytes() == render(typed(board), fmt).encode("utf-8")  # CSV keeps its \r\n
    again = Leaderboard.read(paths["json"])
    assert again.to_dict() == json.loads(to_json(typed(board)))
    for fmt in FORMATS:
        assert render(again, fmt) == render(typed(board), fmt)

    (custom,) = write_all(typed(board), folder, stem="final")
    assert {p.name for p in custom.values()} == {"final.csv", "final.md", "final.json", "final.html", "final.tex"}
    assert len(list(folder.iterdir())) == 10


def test_write_all_writes_nothing_when_a_rendering_fails(tmp_path):
    broken = typed(make_board())
    broken.datasets[1].rows[0].members = [Member("misa/0a0a_00000", None)]  # a bug in the producer
    with pytest.raises(TypeError):
        write_all(broken, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_console_shows_each_row_on_the_selection_metric_rounded_as_the_html(board):
    text = to_console(typed(board), Path("/runs/x/ensembles"))
    lines = text.splitlines()
    for entry in board["datasets"]:
        sel = entry["selection_metric"]
        heading = lines.index(f"[{entry['dataset']}] ranked by valid {sel} ({entry['directions'][sel]} is better); "
                              "test difference vs best single with paired bootstrap 95% interval")
        for rank, row in enumerate(entry["rows"], start=1):
            line = lines[heading + 1 + rank]
            assert line.split()[0] == str(rank) and row["name"] in line, line
            assert f"{shown(sel, row['valid'][sel]):>9}{shown(sel, row['test'][sel]):>9}" in line, line
            diff = diff_of(row, sel)
            if defined(diff["diff"]) is None:
                assert "  -  " in line, line
            else:
                assert (f"{shown(sel, diff['diff'], signed=True)} [{shown(sel, diff['low'], signed=True)}, "
                        f"{shown(sel, diff['high'], signed=True)}]") in line, line
            if row["registered"]:
                assert line.rstrip().endswith(row["registered"]), line
    assert lines[-1] == "leaderboard: /runs/x/ensembles/leaderboard.{csv,md,json,html,tex}"


def test_render_dispatches_and_refuses_an_unknown_format(board):
    assert render(typed(board), "csv") == to_csv(typed(board))
    assert render(typed(board), "md") == to_markdown(typed(board))
    assert render(typed(board), "json") == to_json(typed(board))
    assert render(typed(board), "html") == to_html(typed(board))
    assert render(typed(board), "latex") == to_latex(typed(board))
    with pytest.raises(MsaError) as error:
        render(typed(board), "xlsx")
    message = str(error.value)
    assert "\n" not in message and "'xlsx'" in message
    assert all(fmt in message for fmt in FORMATS)


@pytest.mark.parametrize("content, reason", [
    (None, "not found"),
    (b'{"run_dir": "/x", "datasets": [', "not valid JSON"),
    (b"\xff\xfe garbage", "cannot read"),
    (b"[1, 2, 3]", "expected a JSON object"),
    (b'{"run_dir": "/x", "created": "", "protocol": "oof", "folds": 5, "bootstrap": 0}', "missing datasets"),
    (b'{"run_dir": "/x", "created": "", "protocol": "oof", "folds": 5, "bootstrap": 0, '
     b'"datasets": [{"dataset": "d"}]}', "datasets[0] is missing"),
])
def test_reading_a_leaderboard_refuses_a_missing_or_garbled_file(tmp_path, content, reason):
    path = tmp_path / "leaderboard.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(MsaError) as error:
        Leaderboard.read(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and reason in message


def test_reading_a_leaderboard_refuses_a_row_without_its_keys_or_a_bad_direction(board, tmp_path):
    path = tmp_path / "leaderboard.json"
    broken = json.loads(to_json(typed(board)))
    del broken["datasets"][1]["rows"][2]["registered"]
    path.write_text(json.dumps(broken))
    with pytest.raises(MsaError, match=r"datasets\[1\]\.rows\[2\] is missing registered"):
        Leaderboard.read(path)
    broken = json.loads(to_json(typed(board)))
    broken["datasets"][0]["directions"]["corr"] = "up"
    path.write_text(json.dumps(broken))
    with pytest.raises(MsaError, match=r"directions\['corr'\] must be one of higher, lower"):
        Leaderboard.read(path)


# --------------------------------------------------------------------------------------------
# Chart
# --------------------------------------------------------------------------------------------


def png_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_chart_png_is_a_png_with_content_and_closes_its_figure(board):
    figures_before = plt.get_fignums()
    for entry in typed(board).datasets:
        data = chart_png(entry)
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        pixels = png_pixels(data)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 400
        assert (pixels.min(axis=2) < 200).mean() > 0.01  # bars, text and axes, not a blank canvas
    assert plt.get_fignums() == figures_before

    # more plotted rows give a taller chart; a dataset without any difference still draws
    regression = board["datasets"][0]
    plotted = sum(defined(diff_of(r, "mae")["diff"]) is not None for r in regression["rows"])
    assert plotted == 4  # nnls has no mae difference
    section = typed(board).datasets[0]
    few = dataclasses.replace(section, rows=section.rows[:1])
    assert png_pixels(chart_png(few)).shape[0] < png_pixels(chart_png(section)).shape[0]
    empty = dataclasses.replace(section, rows=[section.rows[3]])  # nnls: its mae diff is undefined
    assert chart_png(empty).startswith(b"\x89PNG")
    assert plt.get_fignums() == figures_before


# --------------------------------------------------------------------------------------------
# HTML, checked by what headless Chromium renders
# --------------------------------------------------------------------------------------------


def test_html_is_self_contained_and_escapes_text(board):
    page = to_html(typed(board))
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page)  # every resource is inline
    assert "url(" not in page and "@import" not in page
    assert html.escape(ESCAPED_NAME) in page and ESCAPED_NAME not in page
    assert page.count('src="data:image/png;base64,') == len(board["datasets"])
    assert page.count("<table>") == len(board["datasets"])
    assert RANKING_SENTENCE in page


CHECKER = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>checker</title></head><body>
<pre id="result">pending</pre>
<iframe id="board" src="leaderboard.html" style="width:1400px;height:1000px"></iframe>
<script>
const frame = document.getElementById("board");
// The frame's load event waits for its images, so their sizes are known here. The result is
// written synchronously: an awaited img.decode() runs off the main thread, where Chromium's
// virtual time does not wait for it, and on a loaded machine the DOM was dumped before it ended.
frame.addEventListener("load", () => {
  const doc = frame.contentDocument;
  const images = Array.from(doc.images);
  const text = node => node.textContent.trim();
  const result = {
    title: doc.title,
    h2: Array.from(doc.querySelectorAll("h2")).map(text),
    tables: Array.from(doc.querySelectorAll("table")).map(table => ({
      headers: Array.from(table.querySelectorAll("thead th")).map(text),
      bodyRows: table.tBodies[0].rows.length,
      cells: Array.from(table.tBodies[0].rows).map(row => Array.from(row.cells).map(text)),
      width: table.getBoundingClientRect().width,
    })),
    images: images.map(img => ({complete: img.complete, alt: img.alt,
                                naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight})),
    scripts: doc.scripts.length,
    bodyText: doc.body.innerText,
  };
  document.getElementById("result").textContent = JSON.stringify(result);
});
</script>
</body></html>
"""


class QuietHandler(SimpleHTTPRequestHandler):
    requested: list[str]

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.requested.append(self.path)
        super().do_GET()


@pytest.fixture
def served_board(board, tmp_path):
    """The leaderboard page and a checker page served on 127.0.0.1; yields (base URL, requested paths)."""
    site = tmp_path / "site"
    site.mkdir()
    write_all(typed(board), site)
    (site / "check.html").write_text(CHECKER, encoding="utf-8")
    requested: list[str] = []
    handler = type("Handler", (QuietHandler,), {"requested": requested})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def run_chromium(chromium: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_html_renders_in_headless_chromium(chromium, board, served_board, tmp_path):
    base, requested = served_board
    done = run_chromium(chromium, tmp_path, "--virtual-time-budget=15000", "--dump-dom", f"{base}/check.html")
    assert done.returncode == 0, done.stderr[-2000:]
    match = re.search(r'<pre id="result">(.*?)</pre>', done.stdout, re.DOTALL)
    assert match, f"no result element in Chromium's DOM dump: {done.stdout[:500]!r} {done.stderr[-1000:]}"
    assert match[1] != "pending", "the checker never saw the leaderboard load"
    seen = json.loads(html.unescape(match[1]))

    assert seen["scripts"] == 0
    assert seen["h2"] == [e["dataset"] for e in board["datasets"]]
    assert len(seen["tables"]) == len(board["datasets"])
    for entry, table in zip(board["datasets"], seen["tables"]):
        assert table["bodyRows"] == len(entry["rows"])
        assert table["width"] > 0
        header = table_header(Leaderboard.from_dict({**board, "datasets": [entry]}).datasets[0])
        assert table["headers"] == header
        test_headers = [h for h in header if h.startswith("test ")]
        assert len(test_headers) == len(entry["metrics"])
        assert [row[1] for row in table["cells"]] == [row["name"] for row in entry["rows"]]
        for cells, row in zip(table["cells"], entry["rows"]):
            shown = dict(zip(table["headers"], cells))
            for m, h in zip(entry["metrics"], test_headers):
                assert shown[h] == rounded(m, row["test"][m])  # one decimal for accuracies, three for MAE
    assert ESCAPED_NAME in [row[1] for row in seen["tables"][1]["cells"]]  # escaped in the source, shown as is

    assert len(seen["images"]) == len(board["datasets"])
    for image, entry in zip(seen["images"], board["datasets"]):
        expected = png_pixels(chart_png(Leaderboard.from_dict({**board, "datasets": [entry]}).datasets[0])).shape
        assert image["complete"], image
        assert (image["naturalHeight"], image["naturalWidth"]) == expected[:2]
        assert entry["dataset"] in image["alt"] and entry["selection_metric"] in image["alt"]
    assert RANKING_SENTENCE in seen["bodyText"]
    # the page fetched nothing but itself (the favicon is Chromium's own request)
    assert set(requested) - {"/favicon.ico"} == {"/check.html", "/leaderboard.html"}


def big_board() -> dict:
    """A real-sized board: 14 rows of MOSI metrics with the names, seed groups and
    registrations a sweep gives (the board first seen to scroll sideways at 1400 px)."""
    rng = random.Random(7)
    models = ["invariant", "dbr", "fine", "tfn"]
    rows = []
    for number in range(9):
        name = f"{models[number % 4]}/{rng.getrandbits(32):08x}"
        row = make_row(rng, name, "best single" if number == 0 else "member", MOSI_METRICS, "mae", level=0,
                       members=[(name, 1.0)], best=number == 0, mlflow=f"{rng.getrandbits(128):032x}",
                       registered="msa-invariant-mosi_lite@12" if number == 0 else "")
        row["seeds"] = {"count": 3, "valid_sd": {"mae": rng.uniform(0.001, 0.02)},
                        "test_sd": {m: rng.uniform(0.001, 2.0) for m in MOSI_METRICS}}
        rows.append(row)
    members = [(row["name"], 1 / 9) for row in rows]
    for learner in ("caruana", "nnls", "ridge", "mean"):
        rows.append(make_row(rng, learner, "ensemble", MOSI_METRICS, "mae", level=1, members=members,
                             mlflow=f"{rng.getrandbits(128):032x}",
                             registered="msa-ensemble-mosi_lite@7" if learner == "caruana" else ""))
    rows.append(make_row(rng, "seed ensemble (7 seeds)", "seed ensemble", MOSI_METRICS, "mae", level=1,
                         members=[(f"{rows[0]['name']}-seed-{s}", 1 / 7) for s in range(7)]))
    board = make_board()
    entry = {**board["datasets"][0], "dataset": "mosi_lite", "best_single": rows[0]["name"],
             "rows": ranked(rows, "mae", "lower")}
    return {**board, "run_dir": "/home/user/runs/sweeps/mosi-matrix-20261202-050000", "datasets": [entry]}


LAYOUT_CHECKER = """<!DOCTYPE html>
<html><head><meta charset="utf-8"></head><body style="margin:0">
<pre id="result">pending</pre>
<iframe id="board" src="leaderboard.html" style="width:1400px;height:1000px;border:0"></iframe>
<script>
const frame = document.getElementById("board");
frame.addEventListener("load", () => {
  const doc = frame.contentDocument;
  const table = doc.querySelector("table");
  const rows = Array.from(table.tBodies[0].rows);
  document.getElementById("result").textContent = JSON.stringify({
    viewport: doc.documentElement.clientWidth, scrollWidth: doc.documentElement.scrollWidth,
    tableRight: table.getBoundingClientRect().right,
    heights: rows.map(row => row.getBoundingClientRect().height),
    kinds: rows.map(row => row.cells[2].textContent.trim()),
    bold: rows.map(row => Array.from(row.cells).map(cell => cell.querySelector("strong") !== null)),
    folded: rows.map(row => Array.from(row.querySelectorAll("details")).map(d => d.open)),
  });
});
</script>
</body></html>
"""


def test_a_fourteen_row_board_fits_1400_px_without_scrolling_and_ensemble_rows_stay_one_line(chromium, tmp_path):
    """Headless Chromium lays out a 14-row MOSI board (9 seed groups, 4 ensembles of all 9, a
    seed ensemble) in a 1400 px frame: nothing overflows sideways, an ensemble's members are
    folded so its row is as tall as a member's, and each metric column's best is in bold."""
    board = big_board()
    site = tmp_path / "site"
    site.mkdir()
    write_all(typed(board), site)
    (site / "check.html").write_text(LAYOUT_CHECKER, encoding="utf-8")
    handler = type("Handler", (QuietHandler,), {"requested": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = run_chromium(chromium, tmp_path, "--virtual-time-budget=15000", "--dump-dom",
                            f"http://127.0.0.1:{server.server_address[1]}/check.html")
    finally:
        server.shutdown()
        server.server_close()
    match = re.search(r'<pre id="result">(.*?)</pre>', done.stdout, re.DOTALL)
    assert match and match[1] != "pending", done.stderr[-1000:]
    seen = json.loads(html.unescape(match[1]))
    assert 1380 <= seen["viewport"] <= 1400, seen  # the frame less its vertical scrollbar
    assert seen["scrollWidth"] <= seen["viewport"] and seen["tableRight"] <= seen["viewport"], seen
    member_heights = [h for h, kind in zip(seen["heights"], seen["kinds"]) if kind in ("member", "best single")]
    other_heights = [h for h, kind in zip(seen["heights"], seen["kinds"]) if kind not in ("member", "best single")]
    assert max(other_heights) <= 1.2 * max(member_heights), seen["heights"]
    assert all(not any(folded) for folded in seen["folded"])  # closed until clicked
    assert sum(len(folded) for folded in seen["folded"]) == 5  # the 4 ensembles and the seed ensemble
    (entry,) = board["datasets"]
    header = table_header(typed(board).datasets[0])
    for m in entry["metrics"]:
        column = header.index(f"test {metric_label(m)} {ARROW[entry['directions'][m]]}")
        values = [row["test"][m] for row in entry["rows"]]
        finite = [v for v in values if v is not None and math.isfinite(v)]
        best = min(finite) if entry["directions"][m] == "lower" else max(finite)
        assert [bold[column] for bold in seen["bold"]] == [v == best for v in values], m


def test_html_rows_of_a_seed_group_show_mean_and_sd_rounded_per_metric():
    board = big_board()
    page = to_html(typed(board))
    row = next(r for r in board["datasets"][0]["rows"] if r.get("seeds"))
    sd = row["seeds"]["test_sd"]["acc7"]
    assert f'{rounded("acc7", row["test"]["acc7"])}<span class="sd"> ±{rounded("acc7", sd)}</span>' in page \
        or f'<strong>{rounded("acc7", row["test"]["acc7"])}</strong><span class="sd"> ±{rounded("acc7", sd)}</span>' in page
    assert re.search(r">\d+\.\d{4}<", page) is None  # no four-decimal number left in the page


LATEX = shutil.which("pdflatex")


def test_latex_is_a_booktabs_table_per_dataset_with_one_row_per_model_and_the_best_in_bold(tmp_path):
    board = big_board()
    text = to_latex(typed(board))
    (entry,) = board["datasets"]
    assert text.count(r"\begin{table}") == text.count(r"\end{table}") == 1
    assert text.count(r"\begin{tabular}{lccccc}") == 1  # Model, Acc-2, F1, MAE, Corr, Acc-7
    assert [text.count(rule) for rule in (r"\toprule", r"\bottomrule")] == [1, 1]
    body = text[text.index(r"\midrule") + len(r"\midrule"):text.index(r"\bottomrule")]
    lines = [line for line in body.strip().splitlines() if line.strip() != r"\midrule"]
    rows = paper_rows(typed(board).datasets[0])
    assert len(rows) == 4 + 5  # one row per model (its best trial) and every ensemble
    assert len(lines) == len(rows)
    for line, row in zip(lines, rows):
        assert line.endswith(r"\\") and line.count("&") == 5
        cells = [cell.strip() for cell in line.removesuffix(r"\\").split("&")]
        mae = cells[3]
        assert mae.replace(r"\textbf{", "").split("}")[0].split("$")[0] == rounded("mae", row.test["mae"]).replace("−", "-")
        if row.seeds:
            assert r"$\pm$" in mae
    best_mae = min(r.test["mae"] for r in rows)
    bold = [line for line in lines if rf"\textbf{{{rounded('mae', best_mae)}}}" in line.split("&")[3]]
    assert len(bold) == 1
    assert "invariant (3 seeds)" in text and "stacked ensemble (caruana)" in text
    if LATEX is None:
        pytest.skip("structure checked; compiling needs pdflatex (Debian texlive-latex-recommended), not installed")
    document = tmp_path / "board.tex"
    document.write_text("\\documentclass{article}\\usepackage{booktabs}\\begin{document}\n" + text
                        + "\\end{document}\n")
    done = subprocess.run([LATEX, "-interaction=nonstopmode", "-halt-on-error", document.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]
    assert (tmp_path / "board.pdf").stat().st_size > 1000


def test_html_screenshot_is_not_blank(chromium, served_board, tmp_path):
    base, _ = served_board
    shot = tmp_path / "leaderboard.png"
    done = run_chromium(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1400,1000", "--hide-scrollbars",
                        f"{base}/leaderboard.html")
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.is_file(), done.stderr[-2000:]
    pixels = png_pixels(shot.read_bytes())
    assert pixels.shape[:2] == (1000, 1400)
    dark = pixels.min(axis=2) < 128
    assert dark.mean() > 0.005, "the screenshot is (almost) blank"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # text, table shading, chart colours
