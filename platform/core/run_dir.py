"""The sweep run directory, the second on-disk contract: every path a sweep writes or reads.

A run directory is ``<storage>/<name>-<UTC time>/``. The driver writes it, Tune trial actors and
Ray Train workers write their pair's checkpoints into it (on a cluster it is shared storage),
`msa ensemble` and `msa mlflow` read it. No other module spells out one of these paths:

    sweep.yaml                  the validated config the sweep started with (resume compares)
    layout.json                 which layout (and msa-sweep version) made the folder
    data/<dataset>.pkl          built-in datasets, generated once
    optuna/<pair>.db            one Optuna study per pair (SQLite; the study is named <pair>)
    ray/sweep/                  Tune's experiment state, one for every pair (what `--resume` restores)
    train/<pair>/               Ray Train's per-trial storage (multi-worker trials)
    trials/<pair>/<trial id>/   each trial's best-epoch checkpoint folder (`training.checkpoint`)
    mlflow/mlflow.db, mlflow/artifacts/, mlflow/server.log   the sweep's own MLflow store
    summary.csv, summary.json   per pair: trials complete/pruned/failed, best valid metric and config
    ensembles/                  `msa ensemble`'s leaderboard and retrained checkpoints

It sits in `core` (paths only, no imports beyond pathlib) because tracking, the sweep and the
ensembles all read it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# The run-directory layout this code writes and resumes. Layout 1 (msa-sweep 0.1.0) had the
# same paths but Tune state that pickled the pre-layer module paths (msa.platform.sweep);
# layout 2 had one Tune experiment per pair (``ray/<pair>/``), run one after another.
LAYOUT = 3
LAYOUT_FILE = "layout.json"


def pair_name(model: str, dataset: str) -> str:
    """The name of a (model, dataset) study: ``fine-mosi_lite`` for the dataset named ``mosi_lite``
    (its `DatasetRecord` name, never a path: two files may share a stem)."""
    return f"{model}-{dataset}"


@dataclass(frozen=True)
class RunDir:
    """Paths of one sweep run directory (`root` is absolute)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def config_file(self) -> Path:
        return self.root / "sweep.yaml"

    @property
    def layout_file(self) -> Path:
        return self.root / LAYOUT_FILE

    def is_sweep(self) -> bool:
        return self.config_file.is_file()

    def layout(self) -> int:
        """The layout that made this folder (1: before `layout.json` existed)."""
        try:
            return int(json.loads(self.layout_file.read_text())["layout"])
        except (OSError, ValueError, KeyError, TypeError):
            return 1

    def layout_version(self) -> str:
        """The msa-sweep version that made this folder, as its layout file records it."""
        try:
            return str(json.loads(self.layout_file.read_text())["msa_sweep"])
        except (OSError, ValueError, KeyError, TypeError):
            return "0.1.0"

    def write_layout(self, version: str) -> None:
        self.layout_file.write_text(json.dumps({"layout": LAYOUT, "msa_sweep": version}) + "\n")

    def builtin_dataset(self, name: str) -> Path:
        return self.root / "data" / f"{name}.pkl"

    @property
    def optuna_dir(self) -> Path:
        return self.root / "optuna"

    def study_db(self, pair: str) -> Path:
        return self.optuna_dir / f"{pair}.db"

    def study_url(self, pair: str) -> str:
        return f"sqlite:///{self.study_db(pair)}"

    def study_dbs(self) -> list[Path]:
        """Every study database, in name order (its stem is the pair and the study name)."""
        return sorted(self.optuna_dir.glob("*.db"))

    @property
    def ray_dir(self) -> Path:
        return self.root / "ray"

    @property
    def tune_experiment(self) -> Path:
        return self.ray_dir / "sweep"

    def train_storage(self, pair: str) -> Path:
        return self.root / "train" / pair

    def trials_dir(self, pair: str) -> Path:
        return self.root / "trials" / pair

    def trial(self, pair: str, trial_id: str) -> Path:
        """A trial's best-epoch checkpoint folder."""
        return self.trials_dir(pair) / trial_id

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    @property
    def mlflow_db(self) -> Path:
        return self.mlflow_dir / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.mlflow_dir / "artifacts"

    @property
    def mlflow_log(self) -> Path:
        return self.mlflow_dir / "server.log"

    @property
    def summary_json(self) -> Path:
        return self.root / "summary.json"

    @property
    def summary_csv(self) -> Path:
        return self.root / "summary.csv"

    @property
    def ensembles_dir(self) -> Path:
        return self.root / "ensembles"

    def storage_probe(self, token: str) -> Path:
        """The file a cluster sweep writes for every node to read back (shared storage check)."""
        return self.root / f".msa-storage-check-{token}"
