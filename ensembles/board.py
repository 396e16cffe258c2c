"""The leaderboard as one typed record: `Leaderboard` (the run's facts) holding a `DatasetBoard`
per dataset holding its ranked `BoardRow`s. The ensemble job builds it (`build.py`); every
rendering reads its fields (`leaderboard.py`: CSV, Markdown, JSON; `board_html.py`,
`board_latex.py`, `board_console.py`).

Its file form is JSON (``leaderboard.json``, the source the other formats are rendered from):
`Leaderboard.to_dict` gives the document, `Leaderboard.from_dict` checks one and reads it back.
The document: run facts at the top (``run_dir``, ``created``, ``protocol``, ``folds``,
``bootstrap``) and one entry per dataset with its metric suite, the selection metric, every
metric's direction (``"higher"`` or ``"lower"`` is better, from `msa.platform.core.metrics`),
the best single model and the rows. The rows arrive ranked by the valid selection metric and
keep that order (rank = position, from 1); test is only reported, never used to order anything.
Each row carries its test metrics and, per metric, the difference to the best single model on
test with a paired-bootstrap 95% interval (``test_diff``). A seed group's row has ``seeds``: its
seed count and each metric's standard deviation over the seeds (``valid_sd``, ``test_sd``; its
``valid`` and ``test`` are then the seed means); other rows have none. An undefined value is
``None`` (``null`` in JSON).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msa.ensembles.board_text import number
from msa.platform.core.errors import MsaError
from msa.platform.core.files import finite_or_none

DIRECTIONS = ("higher", "lower")
SPLITS = ("valid", "test")


@dataclass(frozen=True)
class Interval:
    """A row's test score minus the best single model's, with its paired-bootstrap 95% interval."""

    diff: float | None = None
    low: float | None = None
    high: float | None = None

    @property
    def defined(self) -> bool:
        return number(self.diff) is not None


@dataclass(frozen=True)
class Member:
    """A member of a row and its weight (a single model is its own one member, weight 1)."""

    name: str
    weight: float


@dataclass(frozen=True)
class SeedSpread:
    """A seed group's seed count and each metric's standard deviation over its seeds."""

    count: int
    valid_sd: dict[str, float | None]
    test_sd: dict[str, float | None]


@dataclass
class BoardRow:
    """One ranked row: a trial (``member``, ``best single``), a stacked ``ensemble`` or the
    ``seed ensemble``. `mlflow_run_id` and `registered` are filled in once tracked."""

    name: str
    kind: str
    stack_level: int
    valid: dict[str, float | None]  # the selection metric only
    valid_estimate: str  # how the valid score was estimated
    test: dict[str, float | None]
    test_diff: dict[str, Interval | None]
    members: list[Member]
    fit_seconds: float | None
    predict_seconds: float | None
    mlflow_run_id: str = ""
    registered: str = ""  # registry versions, ``name@version, ...``
    seeds: SeedSpread | None = None

    def score(self, split: str, metric: str) -> float | None:
        """Its `metric` on ``valid`` (the selection metric only) or ``test``."""
        return (self.valid if split == "valid" else self.test).get(metric)

    def diff(self, metric: str) -> Interval:
        """Its difference on `metric` (an undefined `Interval` when there is none)."""
        return self.test_diff.get(metric) or Interval()

    def sd(self, split: str, metric: str) -> float | None:
        """The standard deviation over a seed group's seeds of `metric` on `split` (None for a
        row without seeds)."""
        if self.seeds is None:
            return None
        return number((self.seeds.valid_sd if split == "valid" else self.seeds.test_sd).get(metric))


@dataclass
class DatasetBoard:
    """One dataset's section: its metrics, their directions, and its rows in rank order."""

    dataset: str
    metric_suite: str
    task: str
    selection_metric: str
    metrics: list[str]
    directions: dict[str, str]
    best_single: str
    rows: list[BoardRow] = field(default_factory=list)

    def best_rows(self, split: str, metric: str) -> set[int]:
        """Positions of the rows holding the best `split` value of `metric` (ties all count)."""
        values = [number(row.score(split, metric)) for row in self.rows]
        found = [v for v in values if v is not None]
        if not found:
            return set()
        best = min(found) if self.directions[metric] == "lower" else max(found)
        return {i for i, v in enumerate(values) if v == best}


@dataclass
class Leaderboard:
    """A whole leaderboard: the run it ranks and one section per dataset."""

    run_dir: str
    created: str
    protocol: str
    folds: int
    bootstrap: int
    datasets: list[DatasetBoard] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (NaN and infinite floats as None)."""
        return finite_or_none(dataclasses.asdict(self))

    def to_json(self) -> str:
        """``leaderboard.json``: the document indented by 2."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, document: Any) -> "Leaderboard":
        """The record of a JSON document.

        Raises:
            MsaError: a key missing, or a value of the wrong kind (naming where).
        """
        return _read_board(document)

    @classmethod
    def read(cls, path: Path) -> "Leaderboard":
        """Read a ``leaderboard.json``.

        Raises:
            MsaError: the file is missing or unreadable, is not JSON, or is not a leaderboard.
        """
        path = Path(path)
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MsaError(f"leaderboard file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as error:
            raise MsaError(f"cannot read leaderboard {path}: {_one_line(error)}") from None
        except json.JSONDecodeError as error:
            raise MsaError(f"leaderboard {path} is not valid JSON: {_one_line(error)}") from None
        try:
            return cls.from_dict(document)
        except MsaError as error:
            raise MsaError(f"leaderboard {path} is not a leaderboard document: {error}") from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _fields(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _require(document: Any, cls, where: str, optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """`document` as a mapping holding every field of `cls` but the `optional` ones."""
    if not isinstance(document, dict):
        raise MsaError(f"{where} is not an object" if where else f"expected a JSON object, got {type(document).__name__}")
    missing = [name for name in _fields(cls) if name not in document and name not in optional]
    if missing:
        raise MsaError(f"{where + ' is ' if where else ''}missing {', '.join(missing)}")
    return document


def _read_board(document: Any) -> Leaderboard:
    board = _require(document, Leaderboard, "")
    if not isinstance(board["datasets"], list):
        raise MsaError("'datasets' is not a list")
    datasets = [_read_dataset(entry, f"datasets[{d}]") for d, entry in enumerate(board["datasets"])]
    return Leaderboard(**{**{name: board[name] for name in _fields(Leaderboard)}, "datasets": datasets})


def _read_dataset(document: Any, where: str) -> DatasetBoard:
    entry = _require(document, DatasetBoard, where)
    metrics, directions = entry["metrics"], entry["directions"]
    if not isinstance(metrics, list) or not isinstance(directions, dict) or not isinstance(entry["rows"], list):
        raise MsaError(f"{where}: 'metrics' and 'rows' must be lists and 'directions' an object")
    for metric in [*metrics, entry["selection_metric"]]:
        if directions.get(metric) not in DIRECTIONS:
            raise MsaError(f"{where}: directions[{metric!r}] must be one of {', '.join(DIRECTIONS)}")
    rows = [_read_row(row, f"{where}.rows[{r}]") for r, row in enumerate(entry["rows"])]
    return DatasetBoard(**{**{name: entry[name] for name in _fields(DatasetBoard)}, "rows": rows})


def _read_row(document: Any, where: str) -> BoardRow:
    row = _require(document, BoardRow, where, optional=("seeds",))
    for key in ("valid", "test", "test_diff"):
        if not isinstance(row[key], dict):
            raise MsaError(f"{where}.{key} is not an object")
    members = row["members"]
    if not isinstance(members, list) or not all(
            isinstance(m, dict) and "name" in m and number(m.get("weight")) is not None for m in members):
        raise MsaError(f"{where}.members must be a list of {{name, weight}}")
    diffs = {}
    for metric, diff in row["test_diff"].items():
        if diff is not None and not isinstance(diff, dict):
            raise MsaError(f"{where}.test_diff[{metric!r}] is not an object")
        diffs[metric] = None if diff is None else Interval(diff.get("diff"), diff.get("low"), diff.get("high"))
    seeds = row.get("seeds")
    if seeds is not None:
        if not isinstance(seeds, dict) or number(seeds.get("count")) is None:
            raise MsaError(f"{where}.seeds must be an object with a count")
        seeds = SeedSpread(count=seeds["count"], valid_sd=seeds.get("valid_sd") or {}, test_sd=seeds.get("test_sd") or {})
    values = {name: row[name] for name in _fields(BoardRow) if name in row}
    return BoardRow(**{**values, "test_diff": diffs, "seeds": seeds,
                       "members": [Member(name=m["name"], weight=m["weight"]) for m in members]})
