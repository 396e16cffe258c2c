"""`--resume RUN_DIR`: the config a run started with, checked against any config given again,
and the run directory's layout checked against what this version can restore."""
from __future__ import annotations

from pathlib import Path

from msa.platform.core.config import build_dataclass, load_yaml_mapping, merge, parse_overrides, to_plain
from msa.platform.core.errors import MsaError
from msa.platform.core.run_dir import LAYOUT, RunDir
from msa.platform.sweep.config import SweepConfig, load_sweep_config, validate_sweep_config


def resume_config(run_dir: Path, config_path: str | None, overrides: list[str]) -> SweepConfig:
    """The config `run_dir` started with; a given config (or overrides) must match it exactly.

    Raises:
        MsaError: not a run directory, one made by another layout, or a config that differs
            (naming the first differing key).
    """
    folder = RunDir(run_dir)
    started_file = folder.config_file
    if not folder.root.is_dir() or not started_file.is_file():
        raise MsaError(f"{folder.root} is not a sweep run directory (no sweep.yaml); cannot resume it")
    if folder.layout() != LAYOUT:
        made_by = folder.layout_version()
        raise MsaError(f"{folder.root} was made by msa-sweep {made_by} (run-directory layout {folder.layout()}), whose "
                       f"saved Tune state this version cannot restore; resume it with msa-sweep {made_by} or start a new "
                       f"sweep (its trials stay readable: msa ensemble {folder.root})")
    started = validate_sweep_config(
        build_dataclass(SweepConfig, load_yaml_mapping(started_file), where=str(started_file)), where=str(started_file)
    )
    if config_path is None and not overrides:
        return started
    if config_path is not None:
        given = load_sweep_config(config_path, overrides)
    else:
        where = f"{started_file} + command-line overrides"
        given = validate_sweep_config(
            build_dataclass(SweepConfig, merge(to_plain(started), parse_overrides(overrides)), where=where), where=where
        )
    if to_plain(given) != to_plain(started):
        diff = first_difference(to_plain(started), to_plain(given))
        raise MsaError(f"the config differs from the one {folder.root} started with ({diff}); resume without changes")
    return started


def first_difference(a: dict, b: dict, prefix: str = "") -> str:
    """The first key (dotted, in sorted order) whose values differ, with both values.

    Example:
        >>> first_difference({"budget": {"trials": 4}}, {"budget": {"trials": 6}})
        'budget.trials: started with 4, given 6'
    """
    for key in sorted(set(a) | set(b)):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            found = first_difference(a[key], b[key], f"{prefix}{key}.")
            if found:
                return found
        elif a.get(key) != b.get(key):
            return f"{prefix}{key}: started with {a.get(key)!r}, given {b.get(key)!r}"
    return ""
